"""Gradient checkpointing modes: exact gradients in every mode, the memory plan, the activation estimate."""

import pytest
import torch

from helpers import make_pair, tiny_lora_model
from pronghorn.api import FastLanguageModel
from pronghorn.errors import PronghornError
from pronghorn.models import checkpointing
from pronghorn.models.checkpointing import MemoryPlan, checkpoint_mode, layer_activation_bytes, plan_memory
from pronghorn.models.lora import LoRAConfig, attach_lora

GIB = 2**30


@pytest.mark.parametrize("value,mode", [(True, "on"), (False, "off"), (None, "off"), ("unsloth", "offload"),
                                        ("auto", "auto"), ("Offload", "offload"), ("true", "on"), ("off", "off")])
def test_setting_maps_to_mode(value, mode):
    assert checkpoint_mode(value) == mode


def test_unknown_setting_is_a_clear_error():
    with pytest.raises(PronghornError, match="gradient checkpointing must be one of .*'sometimes'"):
        checkpoint_mode("sometimes")


@pytest.mark.parametrize("text,mode", [("true", "on"), ("false", "off"), ("unsloth", "offload"), ("auto", "auto")])
def test_train_config_takes_yaml_bools_and_names(tmp_path, text, mode):
    from pronghorn.train.config import TrainConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"gradient_checkpointing: {text}\n")
    assert TrainConfig.from_yaml(recipe).gradient_checkpointing == mode
    assert TrainConfig().gradient_checkpointing == "auto"


def test_get_peft_model_maps_use_gradient_checkpointing():
    _, model = make_pair("smollm2_tied")
    FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing="unsloth")
    assert model.model.gradient_checkpointing == "offload"
    model.gradient_checkpointing_enable()  # how HF Trainer / TRL call it: the chosen mode is kept
    assert model.model.gradient_checkpointing == "offload"
    model.gradient_checkpointing_disable()
    assert model.model.gradient_checkpointing is False
    model.gradient_checkpointing_enable()  # TRL's disable/re-enable around reference forwards keeps the mode
    assert model.model.gradient_checkpointing == "offload"
    model.gradient_checkpointing_enable(mode="off")
    model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing == "on"
    # the Trainer of transformers 5.17 (the GPU machine's; not 5.23's) also passes every_n_layers
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=1)
    assert model.model.gradient_checkpointing == "on"
    model.gradient_checkpointing_enable(every_n_layers=None, offload=False, some_future_option=None)
    assert model.model.gradient_checkpointing == "on"
    model.gradient_checkpointing_enable(offload=True)
    assert model.model.gradient_checkpointing == "offload"
    with pytest.raises(PronghornError, match="every_n_layers"):
        model.gradient_checkpointing_enable(every_n_layers=2)
    with pytest.raises(PronghornError, match="unsupported options"):
        model.gradient_checkpointing_enable(some_future_option=3)
    _, model = make_pair("smollm2_tied")
    FastLanguageModel.get_peft_model(model, r=4)
    assert model.model.gradient_checkpointing == "auto"  # the default


def _loss_and_grads(model, batch):
    torch.manual_seed(5)  # LoRA dropout: the recomputation must replay the same masks
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _lora_model():
    model = tiny_lora_model(dropout=0.1).train()
    with torch.no_grad():  # B starts at zero; make the adapters matter so every LoRA gradient is tested
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("modes", [("recompute", "recompute"), ("offload", "offload"), ("offload", "keep"),
                                   ("keep", "recompute"), ("offload", "recompute")])
def test_every_mode_gives_identical_gradients(monkeypatch, modes):
    """fp32 on the CPU: recomputation replays the same ops, so loss and gradients are bitwise equal, for
    every per-layer mix (set through the auto plan) and with dropout on. Layer 0's input needs no gradient
    (frozen embeddings): its LoRA gradients must still arrive."""
    model = _lora_model()
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    monkeypatch.setattr(checkpointing, "plan_for_model", lambda *a, **k: MemoryPlan(modes, 1, 1, True))
    model.gradient_checkpointing_enable(mode="auto")
    loss, grads = _loss_and_grads(model, batch)
    assert torch.equal(loss, ref_loss)
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name
    assert grads["model.layers.0.self_attn.q_proj.lora_A"].abs().sum() > 0


@pytest.mark.parametrize("mode", ["on", "offload"])
def test_named_modes_match_off(mode):
    model = _lora_model()
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(mode=mode)
    loss, grads = _loss_and_grads(model, batch)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_split_replay_equals_the_whole_layer_replay(monkeypatch, dropout):
    """Offload replays a decoder layer one residual block at a time (attention block without a graph, MLP block
    with its backward, attention block with its backward): loss and gradients are bitwise the whole-layer
    replay's and the uncheckpointed run's, with dropout drawing the same masks."""
    model = _lora_model()
    for m in model.modules():
        if hasattr(m, "lora_dropout"):
            m.lora_dropout = dropout
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(mode="offload")
    for split in (True, False):
        monkeypatch.setattr(checkpointing, "SPLIT_REPLAY", split)
        loss, grads = _loss_and_grads(model, batch)
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())


def test_plan_keeps_everything_on_a_big_device():
    plan = plan_memory(80 * GIB, layers=32, layer_bytes=GIB, input_bytes=GIB // 64, fixed_bytes=4 * GIB)
    assert plan.modes == ("keep",) * 32 and plan.fits


def test_plan_recomputes_the_fewest_layers_that_fit():
    # usable 35.1 GiB - fixed 4 = 31.1: keep k of 32 with k + (32 - k) / 64 + 1 <= 31.1 -> k = 30
    plan = plan_memory(39 * GIB, layers=32, layer_bytes=GIB, input_bytes=GIB // 64, fixed_bytes=4 * GIB)
    assert plan.modes == ("recompute",) * 2 + ("keep",) * 30 and plan.fits
    assert plan.need_bytes <= 35.1 * GIB


def test_plan_offloads_the_earliest_inputs_when_recomputing_is_not_enough():
    # usable 9 GiB - fixed 4 = 5: inputs of 32 layers (8 GiB) don't fit; 5 - 1 - 2*0.25 = 3.5 -> 14 on device
    plan = plan_memory(10 * GIB, layers=32, layer_bytes=GIB, input_bytes=GIB // 4, fixed_bytes=4 * GIB)
    assert plan.modes == ("offload",) * 18 + ("recompute",) * 14 and plan.fits


def test_plan_says_when_nothing_fits():
    plan = plan_memory(2 * GIB, layers=4, layer_bytes=GIB, input_bytes=GIB // 4, fixed_bytes=4 * GIB)
    assert plan.modes == ("offload",) * 4 and not plan.fits
    assert "may not fit" in plan.summary()
    cpu = plan_memory(2 * GIB, layers=4, layer_bytes=GIB, input_bytes=GIB // 4, can_offload=False)
    assert cpu.modes == ("recompute",) * 4 and not cpu.fits


def test_auto_prints_its_plan_once(monkeypatch, capsys):
    model = tiny_lora_model().train()
    monkeypatch.setattr(checkpointing, "free_memory", lambda device: 10**12)
    model.gradient_checkpointing_enable(mode="auto")
    for _ in range(2):
        model(**_batch()).loss.backward()
    lines = [line for line in capsys.readouterr().out.splitlines() if "gradient checkpointing auto" in line]
    assert len(lines) == 1
    assert lines[0].startswith("pronghorn: gradient checkpointing auto for batch 2 x 256 tokens: 2 layers: 2 keep, "
                               "0 recompute")
    assert lines[0].endswith("GiB of 931.32 GiB free")


def _saved_bytes_ratio(model, x, autocast_dtype=None) -> float:
    """Bytes autograd saves for one LoRA layer (parameters excluded, shared storages counted once) over the
    estimate for the same shapes."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    b, t, _ = x.shape
    cos, sin = model.model._rope(torch.arange(t, device=x.device)[None].expand(b, t), x.dtype)
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast(x.device.type, autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        model.model.layers[1](x, cos, sin, {None: None}, None)
    cfg = model.model.cfg
    lora_bytes = 2 if autocast_dtype is not None else 4
    estimate = layer_activation_bytes(b * t, cfg.hidden_size, cfg.intermediate_size,
                                      cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim,
                                      x.element_size(), lora_rank=4, lora_projections=7, lora_bytes=lora_bytes)
    return sum(saved.values()) / estimate


def test_activation_estimate_matches_what_autograd_keeps():
    """The estimate against what autograd saves: fp32 reference path on the CPU."""
    _, model = make_pair("llama3_gqa_rope_scaling")
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8), seed=1)
    assert 0.85 <= _saved_bytes_ratio(model.train(), torch.randn(2, 64, 48)) <= 1.2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_activation_estimate_on_cuda_kernels_bf16():
    """The same on the GPU path the auto plan budgets for: bf16 weights, autocast, Triton kernels."""
    _, model = make_pair("llama3_gqa_rope_scaling", dtype=torch.bfloat16)
    attach_lora(model.cuda(), LoRAConfig(r=4, lora_alpha=8), seed=1)
    x = torch.randn(2, 256, 48, device="cuda", dtype=torch.bfloat16)
    ratio = _saved_bytes_ratio(model.train(), x, torch.bfloat16)
    print(f"saved / estimated activation bytes on CUDA: {ratio:.3f}")
    assert 0.6 <= ratio <= 1.2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_on_cuda_is_exact_and_saves_memory():
    model = tiny_lora_model().cuda().train()
    batch = {k: v.cuda() for k, v in _batch().items()}
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(mode="offload")
    loss, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_free_memory_respects_the_process_memory_fraction():
    from pronghorn.models.checkpointing import free_memory

    dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.mem_get_info(dev)[1]
    torch.cuda.set_per_process_memory_fraction(0.25, dev)
    try:  # a device without an index (what users write) means the current one
        assert free_memory(torch.device("cuda")) <= 0.25 * total - torch.cuda.memory_allocated(dev)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
    assert free_memory(torch.device("cuda")) > 0.25 * total


def test_offloaded_nf4_layer_dequantizes_once_for_replay_and_backward(monkeypatch):
    """QLoRA + offload on the fused LoRA path (forced, as on a GPU): the replayed layer's dequantized weights serve
    its backward when memory allows, so each NF4 weight is dequantized twice per step (forward, replay; down_proj:
    forward, backward, its replay skips the matmul) instead of three times; the gradients stay bitwise."""
    import importlib

    from pronghorn.kernels import nf4
    from pronghorn.models.linear import Linear

    for name in ("lora_linear", "lora_qkv"):  # not nf4's own dispatch: the CPU dequantizes with the reference
        monkeypatch.setattr(importlib.import_module(f"pronghorn.kernels.{name}"), "use_triton", lambda *t: True)
    model = _lora_model()
    for m in model.modules():
        if isinstance(m, Linear):
            m.lora_dropout = 0.0  # fused ops take no dropout
            m.quantize_nf4()
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    calls = [0]
    original = nf4.dequantize_nf4_reference
    monkeypatch.setattr(nf4, "dequantize_nf4_reference", lambda *a: calls.__setitem__(0, calls[0] + 1) or original(*a))
    model.gradient_checkpointing_enable(mode="offload")
    loss, grads = _loss_and_grads(model, batch)
    layers = len(model.model.layers)
    assert calls[0] == layers * 7 * 2
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())
    monkeypatch.setattr(checkpointing, "free_memory", lambda device: 0)  # no room: dequantized again
    calls[0] = 0
    _loss_and_grads(model, batch)
    # per layer: forward 7; replay (split): attention block without a graph 4, MLP block 2 (down skipped), its
    # backward 3, attention block again 3 (o skipped), its backward 4 (layer 0's q, k, v need no input gradient)
    assert calls[0] == layers * (7 + 4 + 2 + 3 + 3 + 4) - 3
