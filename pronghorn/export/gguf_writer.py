"""Write a model (adapter merged) as GGUF files for llama.cpp, Ollama and LM Studio -- no llama.cpp build.

One file per quantization method, ``<dir>/model.<METHOD>.gguf`` (model.F16.gguf, model.Q8_0.gguf, ...), plus an
Ollama ``Modelfile`` for the first one. Written with the ``gguf`` package the way llama.cpp's converter writes
them, in the architecture and tensor names the family's spec gives (models/families/): ``llama`` for
Llama/SmolLM2/Mistral (q/k rows permuted to llama.cpp's interleaved rope layout, which
pronghorn/models/gguf_loading.py undoes on read), ``qwen2`` and ``qwen3`` as themselves; tied
embeddings write no ``output.weight``; llama3 rope scaling becomes the ``rope_freqs`` tensor of per-frequency
divisors; linear and yarn scaling become ``rope.scaling.*`` keys. Quantization rules: gguf_quant.py.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..errors import PronghornError, UnsupportedModelError
from ..files import atomic_dir, chmod_like_mkdir
from ..models.families import FAMILIES, GGUF_GLOBALS
from ..models.hf_layout import fuse_split
from .gguf_quant import Method, encode, resolve_methods, tensor_type
from .gguf_tokenizer import gguf_vocab
from .merged import iter_merged
from .ollama import ollama_modelfile

_EXPORTS = {t: s for t, s in FAMILIES.items() if s.gguf_arch is not None}


def gguf_file_name(method: Method) -> str:
    return f"model.{method.name.upper()}.gguf"


def gguf_name(hf_name: str, layers: dict[str, str]) -> str:
    """llama.cpp's name for a Hugging Face tensor (``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight``),
    ``layers`` being the family's per-layer names (``FamilySpec.gguf_layers``)."""
    if hf_name in GGUF_GLOBALS:
        return GGUF_GLOBALS[hf_name]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) >= 5:
        stem = layers.get(".".join(parts[3:-1]))
        if stem is not None:
            return f"blk.{parts[2]}.{stem}.{parts[-1]}"
    raise UnsupportedModelError(f"tensor {hf_name} has no GGUF name; pronghorn cannot export it")


def permute_for_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k row order -> llama.cpp's interleaved pairs (inverse of gguf_loading.unpermute_rope_rows)."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, d, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` tensor: per frequency, the divisor llama3 scaling applies (1 .. factor)."""
    theta, factor = rope["rope_theta"], rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    original = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    wavelen = 2 * math.pi / freqs.astype(np.float64)
    smooth = (original / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid)).astype(np.float32)


def _check_supported(cfg) -> str:
    spec = _EXPORTS.get(cfg.model_type)
    if spec is None:
        raise UnsupportedModelError(f"GGUF export supports {', '.join(_EXPORTS)} models, not {cfg.model_type!r}")
    arch = spec.gguf_arch
    kind = cfg.rope.get("rope_type", "default")
    if kind not in spec.gguf_rope_types:
        raise UnsupportedModelError(f"rope scaling {kind!r} has no GGUF equivalent in llama.cpp; export the merged "
                                    "checkpoint instead (format merged)")
    if kind == "llama3" and arch != "llama":
        raise UnsupportedModelError(f"llama3 rope scaling on a {cfg.model_type} model cannot be written to GGUF")
    if any(t == "sliding_attention" for t in cfg.layer_types) and spec.gguf_metadata is None:
        if arch != "llama":
            raise UnsupportedModelError(f"{cfg.model_type} with sliding-window layers cannot be written to GGUF")
        warnings.warn(f"llama.cpp runs this {cfg.model_type} model with full attention (its sliding window of "
                      f"{cfg.sliding_window} is not stored in the GGUF), as llama.cpp's converter does",
                      UserWarning, stacklevel=3)
    return arch


def _tensors(model: nn.Module, arch: str, base_checkpoint) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 numpy array in llama.cpp's layout) for every tensor, adapter merged."""
    cfg = model.config
    spec = FAMILIES[cfg.model_type]
    if cfg.rope.get("rope_type") == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(cfg.rope, cfg.head_dim)
    for hf_name, t in fuse_split(cfg, iter_merged(model, torch.float32, base_checkpoint)):
        name = gguf_name(hf_name, spec.gguf_layers)
        w = t.numpy()
        if spec.gguf_permute_qk and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            w = permute_for_llama_cpp(w, heads)
        if cfg.parts.norm_offset and hf_name.endswith("norm.weight"):  # llama.cpp stores Gemma's (1 + w)
            w = w + np.float32(cfg.parts.norm_offset)
        yield name, w


def _write_metadata(writer, model: nn.Module, arch: str, method: Method, name: str) -> None:
    from gguf import LlamaFileType, RopeScalingType

    cfg = model.config
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(LlamaFileType[method.file_type])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.parts.rotary_dim or cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    rope = cfg.rope
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        if rope.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for hf_key, gguf_key in (("attention_factor", "attn_factor"), ("beta_fast", "yarn_beta_fast"),
                                 ("beta_slow", "yarn_beta_slow")):
            if rope.get(hf_key) is not None:
                writer.add_float32(f"{arch}.rope.scaling.{gguf_key}", float(rope[hf_key]))
    spec = FAMILIES[cfg.model_type]
    if spec.gguf_metadata is not None:
        spec.gguf_metadata(writer, cfg)
    if method.default not in ("F32", "F16", "BF16"):
        writer.add_quantization_version(2)


def _write_file(path: Path, model: nn.Module, arch: str, method: Method, vocab, name: str,
                base_checkpoint) -> dict[str, str]:
    from gguf import GGMLQuantizationType, GGUFWriter

    cfg = model.config
    has_output = not cfg.tie_word_embeddings
    writer = GGUFWriter(str(path), arch)
    _write_metadata(writer, model, arch, method, name)
    vocab.write(writer)
    types = {}
    for tname, w in _tensors(model, arch, base_checkpoint):
        kind = tensor_type(method, tname, w.shape, cfg.num_hidden_layers, has_output)
        data = encode(w, kind)
        raw = None if kind in ("F32", "F16") else GGMLQuantizationType[kind]
        writer.add_tensor(tname, data, raw_dtype=raw)
        types[tname] = kind
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return types


def save_gguf(model: nn.Module, path: str | Path, tokenizer, quantization_method: str | list[str] = "f16",
              overwrite: bool = False, base_checkpoint: str | Path | None = None,
              modelfile: bool = True) -> list[Path]:
    """Write ``model.<METHOD>.gguf`` for each method (and an Ollama Modelfile) into the new directory ``path``.

    The directory is built beside ``path`` and renamed into place at the end, so a failure leaves nothing; an
    existing non-empty ``path`` is replaced only with ``overwrite=True``. Returns the GGUF paths.
    """
    methods = resolve_methods(quantization_method)
    if tokenizer is None:
        raise PronghornError("save_pretrained_gguf needs the tokenizer (the GGUF embeds the vocabulary and chat "
                             "template): model.save_pretrained_gguf(dir, tokenizer, ...)")
    arch = _check_supported(model.config)
    vocab = gguf_vocab(tokenizer, model.config.vocab_size)
    name = Path(str(getattr(model, "name_or_path", None) or "model")).name or "model"
    written = []
    with atomic_dir(path, overwrite=overwrite) as tmp:
        for method in methods:
            _write_file(tmp / gguf_file_name(method), model, arch, method, vocab, name, base_checkpoint)
            written.append(Path(path) / gguf_file_name(method))
        if modelfile:
            template = FAMILIES[model.config.model_type].chat_template
            (tmp / "Modelfile").write_text(ollama_modelfile(gguf_file_name(methods[0]), tokenizer, template))
        chmod_like_mkdir(tmp)
    return written
