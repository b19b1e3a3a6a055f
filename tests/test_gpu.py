"""GPU paths (bf16 weights, autocast training, generation on CUDA); skipped where no GPU exists (CI)."""

import pytest
import torch

from helpers import make_pair, random_examples
from pronghorn.models.lora import LoRAConfig, attach_lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_logits_close_to_fp32_reference():
    hf, ours = make_pair("llama3_gqa_rope_scaling")
    ids = torch.randint(0, 97, (2, 33))
    with torch.no_grad():
        ref = ours(input_ids=ids).logits
        got = ours.to("cuda", torch.bfloat16)(input_ids=ids.cuda()).logits.float().cpu()
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 2e-2  # bf16: ~8 bits of mantissa through 2 layers


def test_bf16_lora_training_step_matches_fp32_direction():
    _, ref_model = make_pair("qwen3_qknorm")
    _, gpu_model = make_pair("qwen3_qknorm")
    for m in (ref_model, gpu_model):
        attach_lora(m, LoRAConfig(r=4, lora_alpha=8), seed=1)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    gpu_model.to("cuda")
    for n, p in gpu_model.named_parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 17))
    ref_model.train()(input_ids=ids, labels=ids).loss.backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = gpu_model.train()(input_ids=ids.cuda(), labels=ids.cuda()).loss
    loss.backward()
    for (n, p), (_, q) in zip(ref_model.named_parameters(), gpu_model.named_parameters()):
        if p.requires_grad:
            assert q.dtype == torch.float32  # adapters stay fp32
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.float().cpu().flatten(), dim=0)
            assert cos > 0.99, n


def test_generate_on_cuda_matches_cpu():
    _, ours = make_pair("smollm2_tied")
    ids = torch.randint(0, 97, (1, 9))
    cpu = ours.eval()
    from pronghorn.infer.generate import generate

    a = generate(cpu, ids, max_new_tokens=12, eos_token_id=[])
    b = generate(cpu.to("cuda"), ids.cuda(), max_new_tokens=12, eos_token_id=[])
    assert a.tolist() == b.cpu().tolist()


def test_trainer_runs_on_cuda_with_autocast(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from pronghorn.train.config import TrainConfig
    from pronghorn.train.trainer import Trainer

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, "<unk>")),
                                  pad_token="<pad>", unk_token="<unk>")
    _, model = make_pair("llama3_gqa_rope_scaling")
    model = model.to("cuda", torch.bfloat16)
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8))
    res = Trainer(model, tok, random_examples(8), TrainConfig(output_dir=str(tmp_path), progress=False, max_steps=10,
                  batch_size=4, gradient_accumulation_steps=1, learning_rate=2e-2, lr_scheduler="constant")).train()
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert res.losses[-1] < res.losses[0]


@pytest.mark.parametrize("name", ["llama3_gqa_rope_scaling", "gemma2", "gemma3_text_softcap"])
def test_training_loss_takes_the_fused_head(monkeypatch, name):
    """The model's training loss must run the Triton head on CUDA (int64 labels included), not the reference:
    with Gemma 2 / 3's final logit soft-cap too."""
    import importlib

    lce = importlib.import_module("pronghorn.kernels.linear_cross_entropy")  # the module, not the function

    def refuse(*args, **kwargs):
        raise AssertionError("the reference head ran on CUDA")

    monkeypatch.setattr(lce, "linear_cross_entropy_reference", refuse)
    _, model = make_pair(name)
    model = model.to("cuda", torch.bfloat16).train()
    ids = torch.randint(0, 97, (2, 17), device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()


def test_a_step_under_max_memory_expands_the_allocators_segments():
    """The first step planned under a user's cap turns on expandable segments (models/allocator.py), unless the
    environment already chose: the segments reserved after it are expandable."""
    from pronghorn.models import allocator

    if allocator.user_allocator_choice() is not None or allocator._state["done"]:
        pytest.skip("the allocator's segments were chosen before this test")
    _, model = make_pair("llama3_gqa_rope_scaling")
    model = model.to("cuda", torch.bfloat16)
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8))
    model.set_memory_budget("8GiB")
    model.train()
    ids = torch.randint(3, 90, (2, 64), device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()
    assert allocator._state["done"]
    torch.cuda.empty_cache()  # (other tests in this process may have left segments that serve a small step)
    fresh = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    ptr = fresh.data_ptr()
    segments = [s for s in torch.cuda.memory_snapshot() if s["address"] <= ptr < s["address"] + s["total_size"]]
    assert segments and segments[0].get("is_expandable")


def test_replays_on_cuda_take_the_forward_adapter_operands(monkeypatch):
    """On CUDA the autograd engine runs the backward in its own thread: the replayed layers still find the
    operands their forward made (kernels/adapter_operands.py), and the gradients are the kept layers', bitwise."""
    from helpers import randomize_lora_b, tiny_lora_model
    from pronghorn.kernels import adapter_operands
    from pronghorn.models.memory_plan import MemoryPlan

    model = tiny_lora_model().cuda().train()
    model.model.step_operands = None  # each step makes its operands (tests/kernels/test_step_operands.py: kept)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    randomize_lora_b(model, seed=2, scale=0.1)
    made = [0]
    original = adapter_operands.scaled_b
    monkeypatch.setattr(adapter_operands, "scaled_b", lambda *a: made.__setitem__(0, made[0] + 1) or original(*a))
    ids = torch.randint(3, 97, (2, 40), device="cuda")
    runs = []
    for plan in (None, MemoryPlan(("recompute", "offload"), split_replay=True)):
        model.model.forced_plan = plan
        made[0] = 0
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((made[0], loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (kept_makes, ref_loss, ref_grads), (replay_makes, loss, grads) = runs
    assert replay_makes == kept_makes == 7 * len(model.model.layers)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())


def test_fp32_adapter_gradients_come_from_the_matmul_on_cuda(monkeypatch):
    """A bf16 base with fp32 adapters under autocast: the adapters' gradients are written in fp32 by their matmuls
    (kernels/lora_math.grad_mm, ``out_dtype``), with no cast after; they differ from the matmul-then-cast path
    only by that path's rounding of each gradient to bf16 (half a unit in bf16's last place) and the matmuls'
    own order of summation."""
    from helpers import randomize_lora_b, tiny_lora_model
    from pronghorn.kernels import lora_math

    model = tiny_lora_model().cuda().train()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    randomize_lora_b(model, seed=2, scale=0.1)
    ids = torch.randint(3, 97, (2, 40), device="cuda")
    runs = []
    for out_dtype in (True, False):
        monkeypatch.setattr(lora_math, "_OUT_DTYPE", [out_dtype])
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        assert lora_math._OUT_DTYPE[0] is out_dtype  # this torch takes out_dtype: the fp32 path ran
        runs.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    direct, cast = runs
    for n, g in cast.items():
        assert direct[n].dtype == torch.float32
        assert ((direct[n] - g).abs() <= 2 ** -8 * g.abs() + 1e-3 * g.abs().max()).all(), n


def test_offloaded_split_layers_on_cuda_park_the_mlp_input_exactly():
    """Offload with split replay on CUDA: each layer's input and its MLP block's input go to pinned host memory on
    the side stream and come back by the prefetch chain (MLP input first, then the layer input, then the layer
    below's MLP input); loss and gradients are the kept layers', bitwise."""
    from helpers import randomize_lora_b, tiny_lora_model
    from pronghorn.models.memory_plan import MemoryPlan

    model = tiny_lora_model().cuda().train()
    randomize_lora_b(model, seed=4, scale=0.1)
    ids = torch.randint(3, 97, (2, 40), device="cuda")
    runs = []
    for plan in (None, MemoryPlan(("offload",) * len(model.model.layers), split_replay=True)):
        model.model.forced_plan = plan
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (ref_loss, ref_grads), (loss, grads) = runs
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())
