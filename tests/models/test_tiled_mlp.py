"""Sequence-tiled MLP: the same outputs and gradients as the untiled block, one chunk's intermediates at a time."""

import pytest
import torch

from helpers import make_pair, tiny_lora_model
from pronghorn.errors import PronghornError
from pronghorn.models.memory_plan import MemoryPlan
from pronghorn.models.quantized_checkpoint import quantize_model_nf4
from pronghorn.models.tiled_mlp import sequence_tiled, tiled_mlp_mode

HIDDEN, INTERMEDIATE = 48, 80  # tests/helpers.py's tiny configs
FP32 = dict(rtol=1e-5, atol=1e-6)  # the same ops; only the order of the sums over chunks differs


def _model(dtype=torch.float32, dropout=0.0, nf4=False):
    model = tiny_lora_model(dropout=dropout, dtype=dtype).train()
    if nf4:
        quantize_model_nf4(model)  # the bases only; the adapters stay fp32 and trainable
    with torch.no_grad():  # B starts at zero; make every adapter matter
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def _block_grads(layer, x, chunk, tiled):
    """Output, input gradient and every trainable parameter's gradient of norm + MLP on ``x``."""
    params = [p for p in [*layer.post_attention_layernorm.parameters(), *layer.mlp.parameters()] if p.requires_grad]
    for p in params:
        p.grad = None
    x = x.detach().requires_grad_()
    torch.manual_seed(7)  # dropout, when on
    y = sequence_tiled(layer._norm_mlp, x, chunk, params) if tiled else layer._norm_mlp(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype))
    return y.detach(), x.grad, {id(p): p.grad.clone() for p in params}


def _assert_block_matches(model, x, chunk, **tol):
    layer = model.model.layers[1]
    y0, dx0, g0 = _block_grads(layer, x, chunk, tiled=False)
    y1, dx1, g1 = _block_grads(layer, x, chunk, tiled=True)
    torch.testing.assert_close(y1, y0, **tol)
    torch.testing.assert_close(dx1, dx0, **tol)
    assert g0.keys() == g1.keys() and len(g0) >= 6  # A and B of gate, up, down (+ the norm when trainable)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], **tol)


@pytest.mark.parametrize("batch,seq,chunk", [(1, 13, 4), (3, 7, 5), (2, 16, 8), (1, 5, 64)])
def test_tiled_block_equals_untiled_fp32(batch, seq, chunk):
    """Token counts that chunks do not divide, batch 1 and > 1, a chunk larger than the input; a trainable
    norm weight accumulates its gradient over the chunks like the adapters."""
    model = _model()
    model.model.layers[1].post_attention_layernorm.weight.requires_grad_(True)
    x = torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(batch * seq))
    _assert_block_matches(model, x, chunk, **FP32)


def test_tiled_block_equals_untiled_nf4_bases():
    model = _model(nf4=True)
    assert model.model.layers[1].mlp.gate_proj.is_quantized
    _assert_block_matches(model, torch.randn(2, 9, HIDDEN, generator=torch.Generator().manual_seed(3)), 4, **FP32)


def test_tiled_block_equals_untiled_bf16():
    """bf16 base, fp32 adapters: every token's row runs the same bf16 ops, so outputs and the input gradient
    agree to bf16 rounding; the adapters' fp32 gradients differ only in the order of the chunk sums."""
    model = _model(dtype=torch.bfloat16)
    x = torch.randn(2, 11, HIDDEN, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    _assert_block_matches(model, x, 6, rtol=1.6e-2, atol=1e-2)  # bf16: 8 bits of mantissa


def _tiled_vs_autograd_over_the_same_chunks(layer, x, chunk, autocast=False):
    """The tiled block against autograd run chunk by chunk (a forward and a backward per chunk, the parameters'
    gradients accumulating in their own dtype, as the tiled backward sums them). Backwards run outside any
    autocast block, as a training loop runs them."""
    params = [p for p in layer.mlp.parameters() if p.requires_grad]
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    results = []
    for tiled in (True, False):
        for p in params:
            p.grad = None
        xi = x.clone().requires_grad_()
        torch.manual_seed(9)
        if tiled:
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                y = sequence_tiled(layer._norm_mlp, xi, chunk, params)
            y.backward(dy.to(y.dtype))
        else:
            ys, rows, drows = [], xi.view(-1, HIDDEN), dy.view(-1, HIDDEN)  # tokens of all rows, in order
            for s in range(0, rows.shape[0], chunk):
                with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                    ys.append(layer._norm_mlp(rows[s:s + chunk]))
                ys[-1].backward(drows[s:s + chunk].to(ys[-1].dtype))
            y = torch.cat(ys).view(*x.shape[:-1], -1)
        results.append((y.detach(), xi.grad, [p.grad.clone() for p in params]))
    (y1, dx1, g1), (y0, dx0, g0) = results
    assert torch.equal(y1, y0)
    torch.testing.assert_close(dx1, dx0, **FP32)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, **FP32)


def test_dropout_masks_replay_chunk_by_chunk():
    """With LoRA dropout each chunk draws its own masks; the backward must replay exactly those."""
    layer = _model(dropout=0.3).model.layers[1]
    _tiled_vs_autograd_over_the_same_chunks(layer, torch.randn(1, 10, HIDDEN), 4)


def test_backward_recomputes_in_the_forwards_autocast_dtype():
    layer = _model().model.layers[1]
    _tiled_vs_autograd_over_the_same_chunks(layer, torch.randn(2, 7, HIDDEN), 3, autocast=True)


def _saved_shapes(fn, module):
    """Shapes of the tensors (not ``module``'s weights) autograd saves while ``fn`` runs (forward and backward)."""
    shapes, weights = [], {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_forward_keeps_only_the_input_and_backward_one_chunk():
    layer = _model().model.layers[1]
    params = [p for p in layer.mlp.parameters() if p.requires_grad]
    x = torch.randn(2, 15, HIDDEN, requires_grad=True)
    untiled = _saved_shapes(lambda: layer._norm_mlp(x), layer)
    assert sum(s[-1] == INTERMEDIATE for s in untiled) >= 3  # gate, up, their product (or its parts)
    y = None

    def forward():
        nonlocal y
        y = sequence_tiled(layer._norm_mlp, x, 4, params)

    assert _saved_shapes(forward, layer) == [(30, HIDDEN)]  # the block's input, flattened; nothing per chunk
    backward = _saved_shapes(lambda: y.sum().backward(), layer)
    wide = [s for s in backward if s[-1] == INTERMEDIATE]
    assert wide and max(s[0] for s in wide) == 4  # recomputed one chunk at a time
    assert all(s[0] <= 4 for s in backward if len(s) == 2 and s[-1] in (HIDDEN, INTERMEDIATE))


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _padded_batch():
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _packed_row():
    """One padding-free row of three sequences (positions restart at each)."""
    ids = torch.randint(3, 97, (1, 17), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([list(range(6)) + list(range(4)) + list(range(7))])
    labels = ids.clone()
    labels[0, [5, 9]] = -100  # no label crosses a boundary
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


@pytest.mark.parametrize("mode", ["off", "on", "offload", "auto"])
@pytest.mark.parametrize("batch", [_padded_batch, _packed_row], ids=["padded_b2", "packed_rows1"])
def test_whole_model_loss_and_lora_grads_equal_tiled_or_not(monkeypatch, mode, batch):
    """Each checkpointing mode ("auto": a plan that mixes offload and recompute, as a GPU would make); the layers'
    recomputation replays the tiled MLP, whose backward recomputes it once more per chunk."""
    model, batch = _model(), batch()
    mixed = {"auto": ("offload", "recompute")}.get(mode)
    model.gradient_checkpointing_enable(mode=mode, tiled_mlp="off")
    model.model.forced_plan = MemoryPlan(mixed) if mixed else None
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(mode=mode, tiled_mlp="on", tiled_mlp_chunk=5)
    model.model.forced_plan = MemoryPlan(mixed, mlp_chunk=5) if mixed else None
    loss, grads = _loss_and_grads(model, batch)
    assert model.memory_plan.mlp_chunk == 5
    torch.testing.assert_close(loss, ref_loss, **FP32)
    assert ref_grads.keys() == grads.keys() and len(grads) == 2 * 7 * 2  # A, B x 7 projections x 2 layers
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, **FP32, msg=name)


def test_auto_tiles_only_when_the_plan_needs_it(monkeypatch, capsys):
    from pronghorn.models import decoder
    from pronghorn.models.memory_plan import estimate_peak, step_sizes

    from dataclasses import replace

    model, batch, chunks = _model(), _padded_batch(), []
    model.gradient_checkpointing_enable(mode="on", tiled_mlp="auto", tiled_mlp_chunk=5)
    monkeypatch.setattr(decoder, "run_layers", lambda layers, x, args, plan, *graphs: chunks.append(args[-1]) or x)
    monkeypatch.setattr(decoder, "device_budget", lambda device, mx: (2**40, "sim"))
    # this tiny layer's attention backward outweighs its MLP's: give the MLP a long-context model's share
    wide = lambda *a, **k: (lambda s: replace(s, mlp_block=8 * s.mlp_block))(step_sizes(*a, **k))  # noqa: E731
    monkeypatch.setattr(decoder, "step_sizes", wide)
    model(**batch)
    s = wide(model.model, 2, 256, torch.float32, torch.device("cpu"), model.lm_head)
    tiled = estimate_peak(s, MemoryPlan(("recompute",) * 2, split_replay=True, mlp_chunk=5))
    monkeypatch.setattr(decoder, "device_budget", lambda device, mx: (int(tiled / 0.96) + 1, "sim"))
    model.model.__dict__.pop("_plans")  # decided once per batch shape and configured budget: forget the first
    model(**batch)
    model(**batch)
    with torch.no_grad():
        model(**batch)  # no backward: auto never tiles
    model.gradient_checkpointing_enable(tiled_mlp="off")
    monkeypatch.setattr(decoder, "device_budget", lambda device, mx: (2**40, "sim"))
    model(**batch)
    assert chunks == [None, 5, 5, None, None]
    lines = [line for line in capsys.readouterr().out.splitlines() if "tiled MLP" in line]
    assert len(lines) == 1 and "tiled MLP (5 tokens)" in lines[0]


@pytest.mark.parametrize("value,mode", [(True, "on"), (False, "off"), (None, "off"), ("Auto", "auto"),
                                        ("true", "on"), ("off", "off")])
def test_setting_maps_to_mode(value, mode):
    assert tiled_mlp_mode(value) == mode


def test_bad_settings_are_clear_errors():
    with pytest.raises(PronghornError, match="tiled_mlp must be one of .*'sometimes'"):
        tiled_mlp_mode("sometimes")
    model = _model()
    with pytest.raises(PronghornError, match="tiled_mlp_chunk must be a positive number of tokens, got 0"):
        model.gradient_checkpointing_enable(tiled_mlp="on", tiled_mlp_chunk=0)


def test_train_config_cli_and_get_peft_model_reach_the_model():
    from pronghorn.api import FastLanguageModel
    from pronghorn.cli import build_parser
    from pronghorn.train.config import TrainConfig

    assert (TrainConfig().tiled_mlp, TrainConfig().tiled_mlp_chunk) == ("auto", 8192)
    assert TrainConfig(tiled_mlp=True).tiled_mlp == "on"
    args = build_parser().parse_args(["train", "--tiled-mlp", "off", "--tiled-mlp-chunk", "1024"])
    assert (args.tiled_mlp, args.tiled_mlp_chunk) == ("off", 1024)
    with pytest.raises(PronghornError, match="tiled_mlp_chunk"):
        TrainConfig(tiled_mlp_chunk=-5)
    _, model = make_pair("smollm2_tied")
    assert model.model.tiled_mlp == "auto"  # the model's default
    FastLanguageModel.get_peft_model(model, r=4, tiled_mlp=False)
    assert model.model.tiled_mlp == "off"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["on", "offload"])
def test_cuda_kernels_tiled_equals_untiled(mode):
    """The GPU path (fused LoRA functions, Triton SwiGLU and RMSNorm, offload to pinned memory), fp32 weights:
    tiled and untiled agree as on the CPU; the tiled block saves only its input there too."""
    model = _model().cuda()
    batch = {k: v.cuda() for k, v in _padded_batch().items()}
    model.gradient_checkpointing_enable(mode=mode, tiled_mlp="off")
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(mode=mode, tiled_mlp="on", tiled_mlp_chunk=5)
    loss, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss, **FP32)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, **FP32, msg=name)
    layer = model.model.layers[1]
    x = torch.randn(2, 15, HIDDEN, device="cuda", requires_grad=True)
    params = [p for p in layer.mlp.parameters() if p.requires_grad]
    assert _saved_shapes(lambda: sequence_tiled(layer._norm_mlp, x, 4, params), layer) == [(30, HIDDEN)]
