"""offload_embedding: an untied, frozen input embedding table in pinned host memory, read by device ids.

On the GPU the lookup must give bitwise the rows of the on-device table (both paths: the device view of the
pinned pages and the host gather), the table must leave device memory, and LoRA training must not notice."""

import pytest
import torch

from helpers import make_pair, randomize_lora_b
from pronghorn.api import FastLanguageModel
from pronghorn.errors import PronghornError
from pronghorn.models import host_embedding
from pronghorn.models.host_embedding import offload_embedding
from pronghorn.models.lora import LoRAConfig, attach_lora

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _lora_llama2(device):
    _, model = make_pair("llama2")  # untied embeddings
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8), seed=3)
    randomize_lora_b(model)
    return model.to(device).train()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cpu_model_keeps_its_table_and_looks_up_as_nn_embedding():
    model = _lora_llama2("cpu")
    weight = model.model.embed_tokens.weight
    assert offload_embedding(model) is False and model.model.embed_tokens.weight is weight
    ids = torch.randint(0, weight.shape[0], (2, 7))
    assert torch.equal(model.model.embed_tokens(ids), torch.nn.functional.embedding(ids, weight))


def test_from_pretrained_refuses_to_offload_a_trained_embedding():
    with pytest.raises(PronghornError, match="offload_embedding keeps the embedding frozen"):
        FastLanguageModel.from_pretrained("default", offload_embedding=True, full_finetuning=True)


def test_offload_needs_pronghorn_embedding():
    model = _lora_llama2("cpu")
    model.model.embed_tokens = torch.nn.Embedding(4, 4)
    with pytest.raises(PronghornError, match="needs pronghorn's Embedding"):
        offload_embedding(model)


@cuda
@pytest.mark.parametrize("device_view", [True, False], ids=["device-view", "host-gather"])
def test_offloaded_table_trains_bitwise_like_the_device_table(monkeypatch, device_view):
    model = _lora_llama2("cuda")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device="cuda")
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    table = model.model.embed_tokens.weight
    before = torch.cuda.memory_allocated()
    if not device_view:
        monkeypatch.setattr(host_embedding, "_alias_on_device", lambda *a: (_ for _ in ()).throw(RuntimeError()))
    assert offload_embedding(model) is True
    moved = model.model.embed_tokens.weight
    assert moved.device.type == "cpu" and moved.is_pinned() and not moved.requires_grad
    assert torch.equal(moved, table.cpu())
    del table
    assert before - torch.cuda.memory_allocated() >= moved.numel() * moved.element_size()
    assert model.device.type == "cuda"
    loss, grads = _loss_and_grads(model, ids)
    view = model.model.embed_tokens.__dict__["_host_view"][1]
    assert (view is not None) == device_view
    assert torch.equal(loss, ref_loss)
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name


@cuda
def test_tied_table_stays_and_a_trainable_host_table_is_refused(capsys):
    _, model = make_pair("smollm2_tied")
    model = model.cuda()
    assert offload_embedding(model) is False
    assert "tied to the output head" in capsys.readouterr().out
    assert model.model.embed_tokens.weight.is_cuda
    _, untied = make_pair("llama2")
    untied = untied.cuda()
    offload_embedding(untied)
    untied.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(PronghornError, match="offloaded to the host and cannot be trained"):
        untied(input_ids=torch.zeros(1, 3, dtype=torch.long, device="cuda"))


def test_offload_embedding_setting_is_checked():
    with pytest.raises(PronghornError, match="offload_embedding must be True, False or 'tied'"):
        FastLanguageModel.from_pretrained("default", offload_embedding="head")


@cuda
def test_tied_table_on_host_streams_the_head():
    """offload_embedding='tied': the loss streams the head from the host (fp32: within 1e-5 of the device head,
    the streamed and chunked heads sum in other orders), logits come from a transient copy (bitwise)."""
    _, model = make_pair("smollm2_tied")
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8), seed=3)
    randomize_lora_b(model)
    model = model.cuda().train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device="cuda")
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    with torch.no_grad():
        ref_logits = model.eval()(input_ids=ids).logits
    assert offload_embedding(model, tied=True) is True
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.lm_head.weight.is_cuda
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref_logits)
    loss, grads = _loss_and_grads(model.train(), ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=name)
