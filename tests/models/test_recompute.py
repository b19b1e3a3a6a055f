"""Activation recompute (models/recompute.py): exact gradients in every mode and replay, the settings."""

import pytest
import torch

from helpers import make_pair, randomize_lora_b, tiny_lora_model
from pronghorn.api import FastLanguageModel
from pronghorn.errors import PronghornError
from pronghorn.models.lora import LoRAConfig, attach_lora
from pronghorn.models.memory_plan import MemoryPlan
from pronghorn.models.recompute import checkpoint_mode


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
    every per-layer mix (a plan handed to the model), whole or split replay, and with dropout on. Layer 0's input
    needs no gradient (frozen embeddings): its LoRA gradients must still arrive."""
    model = _lora_model()
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    for split in (False, True):
        model.model.forced_plan = MemoryPlan(modes, split_replay=split)
        loss, grads = _loss_and_grads(model, batch)
        assert model.memory_plan is model.model.forced_plan
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
    for split in ("split", "whole"):
        model.gradient_checkpointing_enable(mode="offload", replay=split)
        loss, grads = _loss_and_grads(model, batch)
        assert model.memory_plan.splits("offload") == (split == "split")  # split: from a parked MLP input
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())


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


def test_offloaded_nf4_layer_dequantizes_once_for_replay_and_backward(monkeypatch):
    """QLoRA + offload on the fused LoRA path (forced, as on a GPU): the replayed layer's dequantized weights serve
    its backward when the plan says so, so each NF4 weight is dequantized twice per step (forward, replay; down_proj:
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
    layers = len(model.model.layers)
    model.model.forced_plan = MemoryPlan(("offload",) * layers, split_replay=True, reuse_dequantized=True)
    loss, grads = _loss_and_grads(model, batch)
    assert calls[0] == layers * 7 * 2
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())
    model.model.forced_plan = MemoryPlan(("offload",) * layers, split_replay=True, reuse_dequantized=False)
    calls[0] = 0  # a plan without room for the dense weights: dequantized again
    _loss_and_grads(model, batch)
    # per layer: forward 7; replay (split, the MLP block's input parked beside the layer's): MLP block 2 (down
    # skipped), its backward 3, attention block 3 (o skipped), its backward 4 (layer 0's q, k, v need no input
    # gradient)
    assert calls[0] == layers * (7 + 2 + 3 + 3 + 4) - 3
    model.model.forced_plan = MemoryPlan(("recompute",) * layers, split_replay=True, reuse_dequantized=False)
    calls[0] = 0  # recomputed, not offloaded: the attention block is replayed without a graph first (4)
    _loss_and_grads(model, batch)
    assert calls[0] == layers * (7 + 4 + 2 + 3 + 3 + 4) - 3


@pytest.mark.parametrize("name", ["gemma2", "gemma2_no_softcap"])
def test_sandwich_norm_layers_replay_exactly(monkeypatch, name):
    """Gemma 2's post-norms read the attention and MLP outputs in their backward, so a replay must compute those
    values (no output_unused skip there): every plan gives the uncheckpointed gradients bitwise, with the fused
    LoRA path forced as on a GPU."""
    import importlib

    for mod in ("lora_linear", "lora_qkv"):
        monkeypatch.setattr(importlib.import_module(f"pronghorn.kernels.{mod}"), "use_triton", lambda *t: True)
    _, model = make_pair(name)
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8), seed=3)
    randomize_lora_b(model, seed=3, scale=0.1)
    model.train()
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    n = len(model.model.layers)
    for plan in (MemoryPlan(("recompute",) * n), MemoryPlan(("offload",) * n, split_replay=True),
                 MemoryPlan(("recompute",) * n, mlp_chunk=5)):
        model.model.forced_plan = plan
        loss, grads = _loss_and_grads(model, batch)
        assert torch.equal(loss, ref_loss) or plan.mlp_chunk, plan
        for k, g in ref_grads.items():
            if plan.mlp_chunk:  # chunked sums round differently
                torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-6, msg=k)
            else:
                assert torch.equal(grads[k], g), (plan, k)


@pytest.mark.parametrize("step_store", [False, True], ids=["layer-stores", "step-store"])
@pytest.mark.parametrize("split", [False, True])
def test_replays_take_the_adapter_operands_of_the_forward(monkeypatch, split, step_store):
    """A bf16 base with fp32 adapters on the fused LoRA path (forced, as on a GPU) under autocast: each replayed
    layer casts and scales its adapters once, in its forward; its replays (two of the attention block in a split
    replay) take those operands (kernels/adapter_operands.py). With the model's step store
    (kernels/step_operands.py) the later steps, no adapter changed, make none at all. Loss and gradients are
    bitwise the kept layers'."""
    import importlib

    from pronghorn.kernels import adapter_operands

    for name in ("lora_linear", "lora_qkv"):
        monkeypatch.setattr(importlib.import_module(f"pronghorn.kernels.{name}"), "use_triton", lambda *t: True)
    model = tiny_lora_model(dtype=torch.bfloat16).train()
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapters on the bf16 base, as get_peft_model makes them
    randomize_lora_b(model, seed=2, scale=0.1)
    if not step_store:
        model.model.step_operands = None
    made = [0]
    original = adapter_operands.scaled_b
    monkeypatch.setattr(adapter_operands, "scaled_b", lambda *a: made.__setitem__(0, made[0] + 1) or original(*a))
    batch = _batch()
    with torch.autocast("cpu", torch.bfloat16):
        ref_loss, ref_grads = _loss_and_grads(model, batch)
        kept_makes, made[0] = made[0], 0
        model.model.forced_plan = MemoryPlan(("recompute", "offload"), split_replay=split)
        loss, grads = _loss_and_grads(model, batch)
        replay_makes, made[0] = made[0], 0
        model.model.forced_plan = MemoryPlan(("keep", "recompute"), split_replay=split, mlp_chunk=7)
        tiled_loss, tiled_grads = _loss_and_grads(model, batch)  # 24 tokens: 4 chunks
    assert kept_makes == 7 * len(model.model.layers)  # one s * B per projection in the forward
    later = 0 if step_store else kept_makes  # the step store: made in the first step only
    assert replay_makes == later  # and none more in the replays
    assert made[0] == later  # nor in the tiled MLP's chunks and their replays
    assert torch.equal(loss, ref_loss)
    for k, g in ref_grads.items():
        assert g.dtype == torch.float32 and torch.equal(grads[k], g), k
    assert torch.equal(tiled_loss, ref_loss)  # (its gradients are sums over chunks: tests/models/test_tiled_mlp.py)


def test_an_offloaded_split_layer_parks_its_mlp_input_instead_of_replaying_attention(monkeypatch):
    """Split replay of an offloaded layer: the MLP block's input is parked on the host beside the layer's input,
    so the attention block runs twice a step (forward, replay with its backward), not three times; a recomputed
    layer still replays it without a graph first. Gradients bitwise the kept layers', dropout included."""
    from pronghorn.models.decoder import DecoderLayer

    model = _lora_model()
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    calls = [0]
    original = DecoderLayer.attention_block
    monkeypatch.setattr(DecoderLayer, "attention_block",
                        lambda *a, **k: calls.__setitem__(0, calls[0] + 1) or original(*a, **k))
    # attention-block runs in a step of the two layers: 2 per offloaded layer, 3 per recomputed one split; an
    # offloaded layer parks its MLP input by default (split_replay or not), a whole-layer replay runs it twice too
    for modes, split, park, runs in ((("offload", "offload"), True, True, 4), (("recompute", "recompute"), True, True, 6),
                                     (("offload", "recompute"), True, True, 5), (("offload", "offload"), False, True, 4),
                                     (("offload", "recompute"), False, True, 4),
                                     (("offload", "offload"), False, False, 4)):
        model.model.forced_plan = MemoryPlan(modes, split_replay=split, park_offloaded=park)
        calls[0] = 0
        loss, grads = _loss_and_grads(model, batch)
        assert calls[0] == runs, modes
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())
