"""Kept layers as CUDA graphs (models/kept_graphs.py): bitwise the eager step's losses, gradients and weights.

On the CPU a stand-in graph (``EagerGraph``) runs the captured body at every replay: the chaining of outputs
and input gradients between layers, the arguments copied in once a step, the gradients cloned out, the capture
at a shape's second step, re-captures and the two-forwards guard are all exercised. On a GPU the real graphs are
compared with the eager step, fp32 and bf16 under autocast."""

import pytest
import torch

from helpers import moving_padding_batch as _batch, randomize_lora_b, tiny_lora_model
from pronghorn.models.kept_graphs import KeptGraphs
from pronghorn.models.memory_plan import MemoryPlan
from pronghorn.models.replay_graphs import EagerGraph, ReplayGraphs, graphs_possible

GRAPHED = MemoryPlan(("keep", "keep"), kept_graphs=True)
EAGER = MemoryPlan(("keep", "keep"))


def _model(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = tiny_lora_model(dtype=dtype).to(device).train()
    randomize_lora_b(model)
    return model


def _trained(plan, graphs, device="cpu", dtype=torch.float32, autocast=False, steps=4, batches=None):
    """Losses and final trainable weights of ``steps`` AdamW steps under ``plan``, and the last step's grads."""
    model = _model(device, dtype)
    model.model.forced_plan, model.model.kept_graphs = plan, graphs
    stand_in = (EagerGraph,) if device == "cpu" else ()
    model.model.graphs = ReplayGraphs(*stand_in) if plan.replay_graphs else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for step in range(steps):
        batch = (batches or _batch)(step, device)
        with torch.autocast(device, torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, grads, weights, model


def _assert_same(a, b):
    for la, lb in zip(a[0], b[0]):
        assert torch.equal(la, lb)
    for part in (1, 2):
        assert a[part].keys() == b[part].keys()
        for name, t in a[part].items():
            assert torch.equal(t, b[part][name]), name


def test_kept_graphs_train_bitwise_as_the_eager_step_on_the_cpu():
    graphs = KeptGraphs(EagerGraph)
    got = _trained(GRAPHED, graphs)
    _assert_same(got, _trained(EAGER, None))
    shape = next(iter(graphs.shapes.values()))
    assert shape.complete and len(shape.layers) == 2  # captured at the second step, replayed at the third and fourth
    assert list(graphs.capture_counts.values()) == [1] and graphs.failed is None
    assert got[1]["model.layers.0.self_attn.q_proj.lora_A"].abs().sum() > 0
    model = got[3]
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())  # the captures' own leaves swapped back


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a GPU"))])
def test_the_kept_layers_above_replayed_ones_run_as_graphs_too(device):
    """A plan that replays the bottom layer and keeps the top one: the replay as its graphs (models/replay_graphs.py),
    the kept layer as its own (its input needs its gradient), bitwise the same plan run eagerly."""
    mixed = MemoryPlan(("recompute", "keep"), replay_graphs=True, kept_graphs=True)
    graphs = KeptGraphs(*((EagerGraph,) if device == "cpu" else ()))
    got = _trained(mixed, graphs, device, steps=5)
    _assert_same(got, _trained(MemoryPlan(("recompute", "keep")), None, device, steps=5))
    shape = next(iter(graphs.shapes.values()))
    assert shape.complete and len(shape.layers) == 1 and shape.need_x  # the kept layer's input needs its gradient


def test_a_second_forward_before_the_backward_runs_eagerly():
    """Two forwards, one backward (a summed loss): the second forward must not overwrite the saved tensors of
    the first, so it runs eagerly; the gradients are the eager ones."""
    def step(plan, graphs):
        model = _model()
        model.model.forced_plan, model.model.kept_graphs = plan, graphs
        for s in range(3):
            model.zero_grad(set_to_none=True)
            loss = model(**_batch(0)).loss + model(**_batch(1)).loss
            loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    graphs = KeptGraphs(EagerGraph)
    got, want = step(GRAPHED, graphs), step(EAGER, None)
    for name, g in want.items():
        assert torch.equal(got[name], g), name
    assert graphs.in_flight is None or graphs.in_flight[1]


def _captured_model(graphs: KeptGraphs):
    """A model whose kept layers were captured (three steps of one batch, no optimizer)."""
    model = _model()
    model.model.forced_plan, model.model.kept_graphs = GRAPHED, graphs
    for _ in range(3):
        model(**_batch(0)).loss.backward()
    return model


def test_a_forward_never_back_propagated_does_not_hold_the_graphs():
    graphs = KeptGraphs(EagerGraph)
    model = _captured_model(graphs)
    model(**_batch(0)).loss  # dropped: its graph is freed without a backward
    assert not graphs._busy()
    model.zero_grad(set_to_none=True)
    model(**_batch(0)).loss.backward()  # replayed again
    ref = _model()
    ref.model.forced_plan = EAGER
    ref(**_batch(0)).loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), name


def test_moved_adapters_are_captured_again_and_changing_shapes_never_are():
    graphs = KeptGraphs(EagerGraph)
    model = _captured_model(graphs)
    layer = model.model.layers[1]
    layer.mlp.up_proj.lora_A = torch.nn.Parameter(layer.mlp.up_proj.lora_A.detach() * 1.5)
    for _ in range(2):
        model(**_batch(0)).loss.backward()
    assert sorted(graphs.capture_counts.values()) == [2]
    graphs = KeptGraphs(EagerGraph)
    model.model.kept_graphs = graphs
    for length in (10, 12, 14, 16):
        model(**_batch(0, length=length)).loss.backward()
    assert not graphs.shapes and not graphs.capture_counts


def test_kept_graphs_need_a_gpu_and_are_on_by_default_there():
    model = _model()
    assert not graphs_possible(model.model.layers, torch.device("cpu"))
    assert model.model.kept_graphs_setting == "auto"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["fp32", "bf16", "fp32-autocast-bf16"])
def test_kept_graphs_train_bitwise_as_the_eager_step_on_the_gpu(dtype, autocast):
    graphs = KeptGraphs()
    got = _trained(GRAPHED, graphs, "cuda", dtype, autocast, steps=5)
    _assert_same(got, _trained(EAGER, None, "cuda", dtype, autocast, steps=5))
    assert graphs.failed is None and list(graphs.capture_counts.values()) == [1]


def test_a_plan_without_kept_graphs_gives_their_pool_back():
    graphs = KeptGraphs(EagerGraph)
    model = _captured_model(graphs)
    assert graphs.shapes
    model.model.forced_plan = MemoryPlan(("recompute", "keep"))
    model(**_batch(0)).loss.backward()
    assert not graphs.shapes and graphs.pool is None


def test_a_layer_moved_since_the_capture_runs_eagerly_from_there_and_is_captured_again(monkeypatch):
    """A replay checks each layer as its turn comes (the GPU runs the graphs below meanwhile): the layers below a
    moved one run as graphs, it and those above eagerly, with the eager step's gradients bit for bit; the next
    step captures them all again."""
    graphs = KeptGraphs(EagerGraph)
    model = _captured_model(graphs)
    ref = _model()
    ref.model.forced_plan = EAGER
    for m in (model, ref):
        proj = m.model.layers[1].mlp.up_proj
        proj.lora_A = torch.nn.Parameter(proj.lora_A.detach() * 1.5)
    replayed = []
    forward_layer = KeptGraphs.forward_layer
    monkeypatch.setattr(KeptGraphs, "forward_layer", lambda self, shape, i, *a: replayed.append(i) or
                        forward_layer(self, shape, i, *a))
    for step in range(3):
        replayed.clear()
        for m in (model, ref):
            m.zero_grad(set_to_none=True)
            m(**_batch(0)).loss.backward()
        assert replayed == [[0], [0, 1], [0, 1]][step]  # step 0: layer 1 eagerly; 1: captured again; 2: replayed
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            if p.requires_grad:
                assert torch.equal(p.grad, q.grad), (step, name)
    assert sorted(graphs.capture_counts.values()) == [2] and not next(iter(graphs.shapes.values())).stale


def test_a_layer_removed_after_the_capture_captures_again():
    graphs = KeptGraphs(EagerGraph)
    model = _captured_model(graphs)
    ref = _model()
    ref.model.forced_plan = MemoryPlan(("keep",))
    model.model.forced_plan = MemoryPlan(("keep",), kept_graphs=True)
    for m in (model, ref):
        m.model.layers = torch.nn.ModuleList(m.model.layers[:1])
    for _ in range(3):
        for m in (model, ref):
            m.zero_grad(set_to_none=True)
            m(**_batch(0)).loss.backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            if p.requires_grad:
                assert torch.equal(p.grad, q.grad), name
    shape = next(iter(graphs.shapes.values()))
    assert len(shape.layers) == 1 and shape.complete
