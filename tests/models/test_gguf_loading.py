import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, RopeScalingType
from gguf.quants import dequantize, quantize

from pronghorn.errors import CheckpointError, UnsupportedModelError
from pronghorn.models.default_model import find_default_gguf
from pronghorn.models.gguf_loading import read_gguf

TINY = dict(hidden=64, inter=128, layers=2, heads=4, kv=2, head_dim=16, vocab=96, ctx=256)


# ------------------------------------------------------------------------------------ tiny synthetic GGUFs


def _permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF layout -> GGUF layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_hf_state_dict(arch="llama", tied=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = TINY
    h, q, kv = c["hidden"], c["heads"] * c["head_dim"], c["kv"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab"], h)}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (c["inter"], h), p + "mlp.up_proj.weight": (c["inter"], h),
            p + "mlp.down_proj.weight": (h, c["inter"]),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        }  # fmt: skip
        if arch == "qwen2":
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}  # fmt: skip
    shapes["model.norm.weight"] = (h,)
    if not tied:
        shapes["lm_head.weight"] = (c["vocab"], h)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def _gguf_name(hf):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    if hf in fixed:
        return fixed[hf]
    _, _, i, *mod, kind = hf.split(".")
    return f"blk.{i}.{_TO_GGUF['.'.join(mod)]}.{kind}"


def write_tiny_gguf(path, sd, arch="llama", q8_names=(), extra_kv=None, extra_tensors=None, drop=()):
    """Write ``sd`` (HF names, HF layout) as llama.cpp would: q/k permuted for llama, optional Q8_0 tensors."""
    c = TINY
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c["layers"])
    w.add_context_length(c["ctx"])
    w.add_embedding_length(c["hidden"])
    w.add_feed_forward_length(c["inter"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(c["vocab"])
    if arch == "llama":
        w.add_rope_dimension_count(c["head_dim"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{{ messages }}")
    for fn in extra_kv or ():
        fn(w)
    for hf, t in sd.items():
        name = _gguf_name(hf)
        if name in drop:
            continue
        a = t.numpy().astype(np.float32)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            a = _permute(a, c["heads"] if ".attn_q." in name else c["kv"])
        if hf in q8_names:
            w.add_tensor(name, quantize(a, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)
    for name, a in (extra_tensors or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [True, False])
def test_tiny_round_trip_is_exact(tmp_path, arch, tied):
    sd = _tiny_hf_state_dict(arch, tied)
    q8 = {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
          "model.embed_tokens.weight"}  # fmt: skip
    path = write_tiny_gguf(tmp_path / "tiny.gguf", sd, arch=arch, q8_names=q8)
    ckpt = read_gguf(path)
    assert set(ckpt.state_dict) == set(sd)  # lm_head only when untied
    for name, want in sd.items():
        got = ckpt.state_dict[name]
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        if name in q8:  # Q8_0 blocks lie along rows, so row permutation commutes with quantization
            q8_0 = GGMLQuantizationType.Q8_0
            want = torch.from_numpy(dequantize(quantize(want.numpy(), q8_0), q8_0))
        assert torch.equal(got, want), name
    cfg = ckpt.config
    assert cfg["model_type"] == arch and cfg["tie_word_embeddings"] is tied
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 128, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 10000.0 and cfg["rope_scaling"] is None
    assert cfg["attention_bias"] is (arch == "qwen2")
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2) and "pad_token_id" not in cfg
    assert ckpt.chat_template == "{{ messages }}"


def test_tiny_qwen2_matches_transformers(tmp_path):
    """transformers' own GGUF loader agrees on qwen2 (no q/k un-permutation, biases kept)."""
    from transformers import AutoModelForCausalLM

    sd = _tiny_hf_state_dict("qwen2", tied=False)
    write_tiny_gguf(tmp_path / "tiny.gguf", sd, arch="qwen2")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").state_dict()
    ckpt = read_gguf(tmp_path / "tiny.gguf")
    assert set(ref) == set(ckpt.state_dict)
    for name, t in ckpt.state_dict.items():
        assert torch.equal(t, ref[name].float()), name


def test_rope_scaling_metadata(tmp_path):
    sd = _tiny_hf_state_dict()

    def linear(w):
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)

    def yarn(w):
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(64)

    assert read_gguf(write_tiny_gguf(tmp_path / "a.gguf", sd, extra_kv=[linear])).config["rope_scaling"] == {
        "rope_type": "linear", "factor": 2.0}  # fmt: skip
    assert read_gguf(write_tiny_gguf(tmp_path / "b.gguf", sd, extra_kv=[yarn])).config["rope_scaling"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip


def test_llama3_rope_freqs_recovered(tmp_path):
    """Llama 3.x GGUFs carry rope scaling only as the rope_freqs tensor; the parameters are recovered."""
    base, dim, factor, low, high, old = 10000.0, TINY["head_dim"], 8.0, 1.0, 4.0, 8192
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factors = []  # llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    rope = {"rope_freqs.weight": np.array(factors, dtype=np.float32)}
    ckpt = read_gguf(write_tiny_gguf(tmp_path / "l3.gguf", _tiny_hf_state_dict(), extra_tensors=rope))
    assert ckpt.config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in ckpt.state_dict and len(ckpt.state_dict) == len(_tiny_hf_state_dict())


def test_unsupported_architecture_names_file_and_arch(tmp_path):
    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match=r"phi\.gguf.*'phi2'"):
        read_gguf(path)


def test_missing_tensor_names_file_and_tensor(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", _tiny_hf_state_dict(), drop={"blk.1.ffn_up.weight"})
    with pytest.raises(CheckpointError, match=r"m\.gguf.*blk\.1\.ffn_up\.weight"):
        read_gguf(path)


def test_unknown_tensor_is_refused(tmp_path):
    extra = {"blk.0.attn_q_norm.weight": np.ones(16, np.float32)}
    path = write_tiny_gguf(tmp_path / "u.gguf", _tiny_hf_state_dict(), extra_tensors=extra)
    with pytest.raises(UnsupportedModelError, match=r"u\.gguf.*blk\.0\.attn_q_norm\.weight"):
        read_gguf(path)


# ------------------------------------------------------------------------------------ bad files


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.gguf does not exist"):
        read_gguf(tmp_path / "nope.gguf")


def test_directory_is_not_a_gguf(tmp_path):
    with pytest.raises(CheckpointError, match="is not a file"):
        read_gguf(tmp_path)


def test_non_gguf_file(tmp_path):
    path = tmp_path / "model.safetensors.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.gguf is not a readable GGUF"):
        read_gguf(path)


def test_truncated_real_gguf(tmp_path, smollm2_gguf):
    path = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as f:
        path.write_bytes(f.read(1 << 20))
    with pytest.raises(CheckpointError, match=r"truncated\.gguf"):
        read_gguf(path)


def test_truncated_tensor_data(tmp_path):
    """A file cut inside the tensor data (metadata intact) also gives a CheckpointError."""
    full = write_tiny_gguf(tmp_path / "full.gguf", _tiny_hf_state_dict()).read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(full[: len(full) - 1000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf"):
        read_gguf(path)


# ------------------------------------------------------------------------------------ the real SmolLM2 GGUF


@pytest.fixture(scope="session")
def smollm2_gguf():
    return find_default_gguf()


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf):
    return read_gguf(smollm2_gguf)


def test_smollm2_structure(smollm2_checkpoint):
    sd, cfg = smollm2_checkpoint.state_dict, smollm2_checkpoint.config
    assert len(sd) == 272 and "lm_head.weight" not in sd
    assert sum(t.numel() for t in sd.values()) == 134_515_008
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in sd.values())
    assert sd["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0 and cfg["rope_scaling"] is None
    assert "<|im_start|>" in smollm2_checkpoint.chat_template


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_gguf, smollm2_checkpoint):
    """Every parameter equals what transformers' GGUF loader produces (it also un-permutes q/k)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ref = model.state_dict()
    sd = smollm2_checkpoint.state_dict
    assert set(ref) == set(sd) | {"lm_head.weight"}
    for name, t in sd.items():
        assert ref[name].dtype == torch.float32
        assert torch.equal(t, ref[name]), f"{name}: max abs diff {(t - ref[name]).abs().max()}"
    assert torch.equal(ref["lm_head.weight"], sd["model.embed_tokens.weight"])

    theirs, ours = model.config, LlamaConfig(**smollm2_checkpoint.config)
    for field in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                  "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias", "hidden_act",
                  "rope_parameters"):  # fmt: skip
        assert getattr(ours, field) == getattr(theirs, field), field
    # transformers keeps the float32-widened 9.999999747378752e-06; we report the value as written (1e-05)
    assert math.isclose(ours.rms_norm_eps, theirs.rms_norm_eps, rel_tol=1e-6)
