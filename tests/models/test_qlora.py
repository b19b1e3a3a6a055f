"""QLoRA: NF4 base weights in the model, load_in_4bit, and bnb-4bit checkpoint directories both ways."""

import copy
import json

import pytest
import torch

from helpers import make_pair
from pronghorn.errors import CheckpointError
from pronghorn.models.builder import build_model
from pronghorn.models.config import ModelConfig
from pronghorn.models.hf_checkpoint import read_state_dict
from pronghorn.models.linear import Linear
from pronghorn.models.lora import LoRAConfig, attach_lora, lora_modules, merge_lora
from pronghorn.models.quantized_checkpoint import prepare_state_dict, quantize_model_nf4, save_bnb_4bit_dir

NAME = "llama3_gqa_rope_scaling"


def _projections(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear) and n.split(".")[-1].endswith("proj")}


def _qlora_and_dense_twin():
    """(NF4 model, fp32 model whose projections hold exactly the NF4 model's dequantized weights), same adapters."""
    _, model = make_pair(NAME)
    quantize_model_nf4(model)
    twin = copy.deepcopy(model)
    for module in _projections(twin).values():
        dense = module.dense_weight()
        del module.weight
        module.weight = torch.nn.Parameter(dense)
    for m in (model, twin):
        attach_lora(m, LoRAConfig(r=4, lora_alpha=8), seed=7)
    torch.manual_seed(5)
    with torch.no_grad():  # a random B, so A gets a gradient too
        for (_, a), (_, b) in zip(lora_modules(model), lora_modules(twin)):
            a.lora_B.normal_(0, 0.1)
            b.lora_B.copy_(a.lora_B)
    return model, twin


def test_only_projections_are_quantized_and_lora_trains_on_top():
    model, _ = _qlora_and_dense_twin()
    for name, module in _projections(model).items():
        assert module.is_quantized, name
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_lora_gradients_equal_a_model_of_the_dequantized_weights():
    model, twin = _qlora_and_dense_twin()
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))
    losses = []
    for m in (model, twin):
        m.train()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for (name, a), (_, b) in zip(lora_modules(model), lora_modules(twin)):
        torch.testing.assert_close(a.lora_A.grad, b.lora_A.grad, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(a.lora_B.grad, b.lora_B.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_merge_into_an_nf4_base_gives_a_dense_merged_weight():
    model, twin = _qlora_and_dense_twin()
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merge_lora(model)
        merge_lora(twin)
        after = model(input_ids=ids).logits
    for (name, a), b in zip(_projections(model).items(), _projections(twin).values()):
        assert not a.is_quantized and not a.weight.requires_grad, name
        assert torch.equal(a.weight, b.weight), name
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_bnb_4bit_dir_round_trip_is_bit_exact(tmp_path):
    _, model = make_pair(NAME)
    quantize_model_nf4(model)
    save_bnb_4bit_dir(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["load_in_4bit"], qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"]) == \
        ("bitsandbytes", True, "nf4", True)
    cfg = ModelConfig.from_file(tmp_path / "q" / "config.json")
    sd = prepare_state_dict(read_state_dict(tmp_path / "q"), cfg.hf_config, True, torch.float32, "cpu")
    loaded = build_model(cfg, sd, torch.float32)
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(want) == sorted(got)
    assert all(torch.equal(want[k], got[k]) for k in want)
    # Without load_in_4bit the same directory loads dense, at the dequantized values.
    sd = prepare_state_dict(read_state_dict(tmp_path / "q"), cfg.hf_config, False, torch.float32, "cpu")
    dense = build_model(cfg, sd, torch.float32)
    q = model.model.layers[1].mlp.down_proj
    assert torch.equal(dense.model.layers[1].mlp.down_proj.weight, q.dense_weight())


def test_transformers_with_bitsandbytes_reads_our_dir_to_the_same_logits(tmp_path):
    """transformers loads our directory into bitsandbytes ``Linear4bit`` modules; bitsandbytes' own
    ``dequantize_4bit`` of what it loaded, run in a dense transformers model, gives our logits bit for bit.

    Not ``Linear4bit.forward`` itself: on a CPU with AVX512-BF16, bitsandbytes 0.50.2 repacks the weight and
    multiplies in bf16 (not the fp32 reference; it also asserts out_features % 32 == 0, which k_proj's 24
    rows fail), and its AVX-512 ``dequantize_4bit`` kernel takes block ``row * (in // 64) + col // 64``, wrong
    when in_features % blocksize != 0 (this model's 48 and 80). NF4 blocks run over the flattened weight (so
    bitsandbytes' own ``quantize_4bit`` packs them, byte for byte as ours: tests/kernels/test_nf4.py), so we
    dequantize each weight as one row, where that kernel is exact, and reshape.
    """
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoConfig, AutoModelForCausalLM

    _, model = make_pair(NAME)
    quantize_model_nf4(model)
    save_bnb_4bit_dir(model, tmp_path / "q")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), dtype=torch.float32)
    quantized = {n: m for n, m in hf.named_modules() if isinstance(m, Linear4bit)}
    assert sorted(quantized) == sorted(_projections(model))
    state = {k: v for k, v in hf.state_dict().items() if k.rsplit(".weight", 1)[0] not in quantized}
    for name, module in quantized.items():
        qs = copy.copy(module.weight.quant_state)
        assert (qs.quant_type, qs.blocksize, qs.nested, tuple(qs.shape)) == \
            ("nf4", 64, True, tuple(model.get_submodule(name).weight.shape)), name
        qs.shape = torch.Size([qs.shape.numel()])
        state[f"{name}.weight"] = F.dequantize_4bit(module.weight.data, qs).reshape(module.weight.quant_state.shape)
    config = AutoConfig.from_pretrained(str(tmp_path / "q"))
    del config.quantization_config
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    dense.load_state_dict(state, strict=True)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, model(input_ids=ids).logits)


def test_other_quantization_methods_are_refused(tmp_path):
    from pronghorn.models.quantized_checkpoint import check_quantization_config

    with pytest.raises(CheckpointError, match="quant_method is 'gptq'"):
        check_quantization_config({"quantization_config": {"quant_method": "gptq"}}, "x/config.json")
    with pytest.raises(CheckpointError, match="bnb_4bit_quant_type is 'fp4'"):
        check_quantization_config({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                                           "bnb_4bit_quant_type": "fp4"}}, "x/config.json")


@pytest.mark.slow
def test_load_in_4bit_smollm2_loss_close_to_16_bit(smollm2_dir):
    from pronghorn.api import FastLanguageModel

    q, tok = FastLanguageModel.from_pretrained(str(smollm2_dir), load_in_4bit=True, dtype=torch.float32, device="cpu")
    dense, _ = FastLanguageModel.from_pretrained(str(smollm2_dir), dtype=torch.float32, device="cpu")
    assert q.model.layers[0].mlp.gate_proj.is_quantized and not dense.model.layers[0].mlp.gate_proj.is_quantized
    text = ("The capital of France is Paris. The capital of Germany is Berlin. Water boils at one hundred degrees "
            "Celsius at sea level, and the Earth orbits the Sun once a year.")
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        lq = q(input_ids=ids, labels=ids).loss.item()
        ld = dense(input_ids=ids, labels=ids).loss.item()
    # NF4 costs this tiny 135M model ~17% of loss on this text. Measured (CPU fp32): 16-bit 2.4604, ours 2.8689,
    # transformers + bitsandbytes 0.50 load_in_4bit (nf4, double quant) 2.8692. A broken kernel gives >> 25%.
    assert ld < lq < 1.25 * ld, (lq, ld)
