"""Expandable segments under a memory budget (models/allocator.py): turned on once, for a cap the user set on a
CUDA device, and never against the user's own allocator settings. The allocator call itself needs CUDA; here it
is recorded (tests/test_gpu.py runs the real one)."""

import pytest
import torch

from pronghorn.models import allocator


@pytest.fixture
def calls(monkeypatch):
    got = []
    monkeypatch.setattr(allocator, "_state", {"done": False})
    monkeypatch.setattr(allocator, "apply_setting", got.append)
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    return got


@pytest.mark.parametrize("source", ["max_memory=16.00GiB", "set_per_process_memory_fraction(0.1)"])
def test_a_cap_on_cuda_turns_them_on_once(calls, source, capsys):
    assert allocator.expand_segments_under_budget(torch.device("cuda"), source)
    assert not allocator.expand_segments_under_budget(torch.device("cuda"), source)
    assert calls == ["expandable_segments:True"]
    assert "expandable segments on under the memory budget" in capsys.readouterr().out


@pytest.mark.parametrize("device, source", [("cpu", "max_memory=1.00GiB"), ("cuda", "the GPU's free memory"),
                                            ("cuda", "")])
def test_no_cap_or_no_cuda_leaves_the_allocator(calls, device, source):
    assert not allocator.expand_segments_under_budget(torch.device(device), source)
    assert calls == []


@pytest.mark.parametrize("env, value", [("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False"),
                                        ("PYTORCH_ALLOC_CONF", "max_split_size_mb:128,expandable_segments:True"),
                                        ("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")])
def test_the_users_setting_wins(calls, monkeypatch, env, value):
    monkeypatch.setenv(env, value)
    assert allocator.user_allocator_choice() == f"{env}={value}"
    assert not allocator.expand_segments_under_budget(torch.device("cuda"), "max_memory=8.00GiB")
    assert calls == []


def test_other_settings_of_the_user_do_not_count_as_a_choice(calls, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:256")
    assert allocator.user_allocator_choice() is None
    assert allocator.expand_segments_under_budget(torch.device("cuda"), "max_memory=8.00GiB")
    assert calls == ["expandable_segments:True"]


def test_an_allocator_without_the_setting_is_reported(calls, monkeypatch, capsys):
    def refuse(_):
        raise RuntimeError("unknown setting")

    monkeypatch.setattr(allocator, "apply_setting", refuse)
    assert not allocator.expand_segments_under_budget(torch.device("cuda"), "max_memory=8.00GiB")
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in capsys.readouterr().out


def test_the_setting_goes_through_the_current_api():
    """No deprecated call (torch 2.11 warns on ``torch.cuda.memory._set_allocator_settings``; the GPU test failed
    on that warning): the default value, set for real, raises no warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        allocator.apply_setting("expandable_segments:False")


def test_workspaces_are_kept_while_a_captured_graph_lives(monkeypatch):
    """A captured graph bakes in its stream's cuBLAS workspace: while one noted graph lives, the workspaces stay;
    once it is gone, they are freed (the clearing call recorded: it needs CUDA, run for real in the GPU test
    below)."""
    cleared = []
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: cleared.append(1), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(allocator, "_graphs", type(allocator._graphs)())

    class Graph:  # a stand-in for torch.cuda.CUDAGraph (weakly referenced, as it is)
        pass

    graph = Graph()
    allocator.note_graph(graph)
    assert allocator.workspaces_baked() and not allocator.release_workspaces() and not cleared
    del graph
    assert not allocator.workspaces_baked() and allocator.release_workspaces() and cleared == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_replan_estimates_what_the_first_plan_did():
    """A new plan (another budget) after steps that made cuBLAS workspaces and kept-layer graphs: its estimate
    counts no workspace twice (session 23: 128 MiB more on a replan, 2.26 against 2.13 GiB on this model)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_memory_plan import GIB, _gpu_model

    model = _gpu_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 32000, (4, 1024), device="cuda")
    estimates = []
    for budget in (60 * GIB, 50 * GIB):
        model.set_memory_budget(budget)
        for _ in range(3):  # the second step captures the kept layers' graphs
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        estimates.append(model.memory_plan.estimate_bytes)
    assert model.memory_plan.kept_graphs and abs(estimates[1] - estimates[0]) < 16 * 2**20
