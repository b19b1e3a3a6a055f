"""Every new family through the training paths built for Llama: recompute / offload modes with the tiled MLP
(sandwich norms inside the tiles) give the plain run's loss and LoRA gradients; QLoRA (NF4 bases) gives a model of
the dequantized weights' gradients."""

import copy

import pytest
import torch

from helpers import make_pair, randomize_lora_b
from pronghorn.models.linear import Linear
from pronghorn.models.lora import LoRAConfig, attach_lora, lora_modules
from pronghorn.models.quantized_checkpoint import quantize_model_nf4

NAMES = ["gemma", "gemma2", "gemma3_text", "phi3_longrope", "mistral_nemo_headdim"]
FP32 = dict(rtol=1e-5, atol=1e-6)  # tests/models/test_tiled_mlp.py: only the order of the sums over chunks differs


def _batch():
    ids = torch.randint(3, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 5] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["on", "offload"])
def test_recompute_and_tiled_mlp_equal_the_plain_run(name, mode):
    _, model = make_pair(name)
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8), seed=1)
    randomize_lora_b(model)
    model.train()
    batch = _batch()
    model.gradient_checkpointing_enable(mode="off", tiled_mlp="off")
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(mode=mode, tiled_mlp="on", tiled_mlp_chunk=5)
    loss, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss, **FP32)
    assert grads.keys() == ref_grads.keys()
    for key, g in ref_grads.items():
        torch.testing.assert_close(grads[key], g, **FP32, msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_qlora_gradients_equal_a_model_of_the_dequantized_weights(name):
    _, model = make_pair(name)
    quantize_model_nf4(model)
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, Linear) and module.is_quantized:
            dense = module.dense_weight()
            del module.weight
            module.weight = torch.nn.Parameter(dense)
    for m in (model, twin):
        attach_lora(m, LoRAConfig(r=4, lora_alpha=8), seed=7)
        randomize_lora_b(m)
    batch = _batch()
    (loss, grads), (ref_loss, ref_grads) = (_loss_and_grads(m.train(), batch) for m in (model, twin))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert len(list(lora_modules(model))) == 7 * model.config.num_hidden_layers
    for key, g in ref_grads.items():
        torch.testing.assert_close(grads[key], g, rtol=1e-5, atol=1e-7, msg=key)
