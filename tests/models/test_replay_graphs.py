"""Replayed layers as CUDA graphs (models/replay_graphs.py): bitwise the eager replay's gradients.

On the CPU a stand-in graph (``EagerGraph``) runs the captured body at every replay: the static buffers, the
arguments copied in once a step, the gradients cloned out, re-captures and the shapes kept are all exercised.
On a GPU the real graphs are compared with the eager replays, fp32 and bf16 under autocast."""

import pytest
import torch

from helpers import moving_padding_batch as _batch, randomize_lora_b, tiny_lora_model
from pronghorn.errors import PronghornError
from pronghorn.models.memory_plan import MemoryPlan
from pronghorn.models.replay_graphs import (MAX_SHAPES, EagerGraph, ReplayGraphs, graphs_possible,
                                            layer_state, module_signature)

PLANS = [MemoryPlan(("recompute", "recompute"), replay_graphs=True),
         MemoryPlan(("recompute", "keep"), split_replay=True, replay_graphs=True),
         MemoryPlan(("offload", "offload"), park_offloaded=True, replay_graphs=True),
         MemoryPlan(("offload", "recompute"), replay_graphs=True),
         MemoryPlan(("offload", "keep"), park_offloaded=True, replay_graphs=True)]  # kept above a parked replay


def _model(device="cpu", dtype=torch.float32):
    model = tiny_lora_model(dtype=dtype).to(device).train()
    randomize_lora_b(model)
    return model


def _step(model, batch, autocast=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", torch.bfloat16, enabled=autocast is not None):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _compare_steps(model, plan, graphs, device="cpu", autocast=None, steps=4):
    """Steps with the plan's replays as graphs against the same plan replayed eagerly: bitwise equal."""
    for step in range(steps):
        batch = _batch(step, device)
        model.model.forced_plan, model.model.graphs = plan, graphs
        loss, grads = _step(model, batch, autocast)
        model.model.forced_plan = MemoryPlan(plan.layers, plan.split_replay, park_offloaded=plan.park_offloaded)
        ref_loss, ref_grads = _step(model, batch, autocast)
        assert torch.equal(loss, ref_loss), step
        for name, g in ref_grads.items():
            assert torch.equal(grads[name], g), (step, name)
        assert grads["model.layers.0.self_attn.q_proj.lora_A"].abs().sum() > 0


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "-".join(p.layers) + ("-split" if p.splits("recompute") else ""))
def test_graphed_replays_equal_eager_ones_on_the_cpu(plan):
    graphs = ReplayGraphs(EagerGraph)
    model = _model()
    before = {n: id(p) for n, p in model.named_parameters()}
    _compare_steps(model, plan, graphs)
    assert {n: id(p) for n, p in model.named_parameters()} == before  # the replay's own leaves swapped back
    replayed = [m for m in plan.layers if m != "keep"]
    captured = [e for e in graphs.layers.values() if not isinstance(e, str)]
    assert len(captured) == 2 * len(replayed)  # a forward and a backward graph a layer, captured at its second step
    assert {slot[2] for slot in graphs.layers} == {"forward", "backward"}
    assert graphs.failed is None


def test_a_layer_whose_adapter_moves_is_captured_again():
    model = _model()
    plan = PLANS[0]
    graphs = ReplayGraphs(EagerGraph)
    _compare_steps(model, plan, graphs, steps=2)
    layer = model.model.layers[1]
    before = next(e for slot, e in graphs.layers.items() if slot[0] == id(layer)).signature
    assert before == module_signature(layer)
    layer.mlp.up_proj.lora_A = torch.nn.Parameter(layer.mlp.up_proj.lora_A.detach() * 1.5)  # the graphs' is stale
    assert module_signature(layer) != before
    _compare_steps(model, plan, graphs, steps=2)
    assert sum(graphs.captures.values()) == 2 * 2 + 2  # two layers' forward and backward, then layer 1's again


def test_only_the_latest_shapes_keep_graphs():
    model = _model()
    graphs = ReplayGraphs(EagerGraph)
    model.model.forced_plan, model.model.graphs = PLANS[0], graphs
    for length in (8, 8, 10, 10, 12, 12, 8, 8):  # an evicted shape runs eagerly once again, then is captured
        _step(model, _batch(0, length=length))
    assert len(graphs.statics) == MAX_SHAPES
    assert {shape[0][1] for shape in graphs.statics} == {12, 8}


def test_graphs_are_on_by_default_and_a_setting_of_the_model():
    """Whether the plan may take graphs is the model's setting (``gradient_checkpointing_enable``), not the
    environment's; a bad value is an error naming the choices, and None keeps the setting."""
    model = _model()
    assert (model.model.replay_graphs, model.model.kept_graphs_setting) == ("auto", "auto")
    model.gradient_checkpointing_enable(mode="auto", replay_graphs="off", kept_graphs="off")
    assert (model.model.replay_graphs, model.model.kept_graphs_setting) == ("off", "off")
    model.gradient_checkpointing_enable(mode="auto")
    assert (model.model.replay_graphs, model.model.kept_graphs_setting) == ("off", "off")
    with pytest.raises(PronghornError, match="replay_graphs must be one of"):
        model.gradient_checkpointing_enable(mode="on", replay_graphs="on")
    assert model.model.gradient_checkpointing == "auto"  # a refused call changes nothing
    with pytest.raises(PronghornError, match="kept_graphs must be one of"):
        model.gradient_checkpointing_enable(kept_graphs=True)


def test_graphs_are_not_used_on_a_cpu():
    model = _model()
    assert not graphs_possible(model.model.layers, torch.device("cpu"))
    if torch.cuda.is_available():
        assert graphs_possible(model.model.layers, torch.device("cuda"))
    model.gradient_checkpointing_enable(mode="on")
    model(**_batch(0)).loss.backward()
    assert not model.memory_plan.replay_graphs and model.model.graphs is None


def test_graphs_are_refused_where_a_layer_draws_random_numbers():
    """Adapters with dropout, or a dropout module anywhere inside a layer: no graphs (the check walks every
    submodule; the device is only looked at by its type, so a CPU run can ask about CUDA)."""
    cuda = torch.device("cuda")
    model = _model()
    assert graphs_possible(model.model.layers, cuda)
    model.model.layers[1].mlp.down_proj.lora_dropout = 0.1
    assert not graphs_possible(model.model.layers, cuda)
    model.model.layers[1].mlp.down_proj.lora_dropout = 0.0
    model.model.layers[-1].self_attn.extra = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Dropout(0.1))
    assert not graphs_possible(model.model.layers, cuda)
    model.model.layers[-1].self_attn.extra[1].p = 0.0
    assert graphs_possible(model.model.layers, cuda)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [None, "bf16"])
@pytest.mark.parametrize("plan", [PLANS[0], PLANS[2], PLANS[4]], ids=["recompute", "offload-parked", "offload-keep"])
def test_cuda_graphed_replays_equal_eager_ones(plan, autocast):
    graphs = ReplayGraphs()
    _compare_steps(_model("cuda"), plan, graphs, "cuda", autocast)
    assert graphs.failed is None
    assert all(not isinstance(e, str) for e in graphs.layers.values())
    assert graphs.pool_bytes() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_budgeted_plan_takes_graphs_on_a_gpu_and_stays_exact():
    model = _model("cuda", torch.bfloat16)
    model.gradient_checkpointing_enable(mode="on")
    steps = [_step(model, _batch(s, "cuda")) for s in range(3)]
    assert model.memory_plan.replay_graphs and model.model.graphs is not None
    model.model.replay_graphs = "off"
    for s, (loss, grads) in enumerate(steps):
        ref_loss, ref_grads = _step(model, _batch(s, "cuda"))
        assert not model.memory_plan.replay_graphs
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())


def _qlora_model(device="cpu", dtype=torch.float32):
    from pronghorn.models.linear import Linear

    model = _model(device, dtype)
    projections = [m for m in model.model.layers.modules() if isinstance(m, Linear)]
    for m in projections:
        m.quantize_nf4()
    assert len(projections) == 14 and model.model.layers[0].mlp.down_proj.is_quantized
    return model


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("plan", [PLANS[0], PLANS[2]], ids=["recompute", "offload-parked"])
def test_graphed_replays_of_a_qlora_model_equal_eager_ones(plan, device):
    """NF4 bases (QLoRA): the captured replay dequantizes each weight once for its recompute and backward
    (``dequantized_once``), as the eager replay does; bitwise equal (the CPU: the stand-in graph; a GPU: real
    graphs of a bf16 model under autocast)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cuda = device == "cuda"
    graphs = ReplayGraphs() if cuda else ReplayGraphs(EagerGraph)
    model = _qlora_model(device, torch.bfloat16 if cuda else torch.float32)
    _compare_steps(model, plan, graphs, device, "bf16" if cuda else None)
    assert graphs.failed is None and any(not isinstance(e, str) for e in graphs.layers.values())


def test_shapes_that_change_every_step_are_not_captured():
    """Batches padded to their longest row change shape from step to step: a shape is captured only when a step
    repeats the shape of the step before (a capture that would not be replayed is not made)."""
    model = _model()
    graphs = ReplayGraphs(EagerGraph)
    model.model.forced_plan, model.model.graphs = PLANS[0], graphs
    for length in (8, 10, 8, 10, 12, 8):
        _step(model, _batch(0, length=length))
    assert not graphs.captures and not graphs.statics
    for length in (10, 10, 10):
        _step(model, _batch(0, length=length))
    assert sum(graphs.captures.values()) == 4  # two layers' forward and backward graphs, at the second 10


@pytest.mark.parametrize("qlora", [False, True])
def test_one_walk_gives_torchs_lists_and_sees_every_change(qlora):
    """``layer_state``: the trainable parameters are ``parameters()``'s, in its order; the signature is stable
    from step to step and changes when a tensor moves, changes dtype, shape or whether it trains, or an adapter is
    switched, rescaled, replaced or removed."""
    model = _model()
    layer = model.model.layers[0]
    if qlora:
        for m in layer.modules():
            if hasattr(m, "quantize_nf4"):
                m.quantize_nf4()
    params, signature = layer_state(layer)
    assert [id(p) for p in params] == [id(p) for p in layer.parameters() if p.requires_grad] and params
    assert signature == module_signature(layer) == layer_state(layer)[1]
    n_tensors = len({id(t) for t in (*layer.parameters(), *layer.buffers())})
    assert len(signature[0]) == n_tensors
    proj = layer.self_attn.o_proj
    changes = [
        lambda: setattr(proj, "lora_enabled", False),
        lambda: setattr(proj, "lora_scaling", proj.lora_scaling * 2),
        lambda: setattr(proj.lora_B, "data", proj.lora_B.detach().clone()),  # moved, no new Parameter
        lambda: setattr(proj.lora_A, "data", proj.lora_A.detach().double()),
        lambda: proj.lora_B.requires_grad_(False),  # a graph's backward returns the gradients it was captured for
        lambda: setattr(proj, "lora_A", torch.nn.Parameter(proj.lora_A.detach()[:2].clone())),
        proj.remove_lora,
    ]
    for change in changes:
        before = layer_state(layer)[1]
        change()
        assert layer_state(layer)[1] != before
