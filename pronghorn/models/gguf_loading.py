"""Read a GGUF checkpoint (llama.cpp's format) into a Hugging Face-style config and float32 state dict.

The architectures read are those a family spec marks ``gguf_reads`` (models/families/: ``llama`` for Llama,
SmolLM2 and Mistral-as-llama, ``qwen2``, ``gemma`` 1-3 and ``phi3``); the spec gives the tensor names and the
config fields the architecture implies. Quantized tensors are dequantized with ``gguf.quants.dequantize``; llama.cpp's rope
permutation of the q/k projections (``gguf_permute_qk``) is undone, so the result matches what transformers loads.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, UnsupportedModelError
from .config import ModelConfig
from .families import FAMILIES, FamilySpec
from .hf_layout import fuse_split

_READERS: dict[str, FamilySpec] = {s.gguf_arch: s for s in FAMILIES.values() if s.gguf_reads}
SUPPORTED_ARCHITECTURES = tuple(_READERS)
# Tensors llama.cpp writes that carry no weights of their own (old rotary inv_freq caches).
_IGNORED = re.compile(r"^blk\.\d+\.attn_rot_embd(\.weight)?$")


@dataclass
class GGUFCheckpoint:
    """What :func:`read_gguf` returns: HF ``config.json``-style dict, HF-named float32 tensors in the family's
    checkpoint layout (Phi-3's fused; ``hf_layout.split_fused`` splits them), chat template."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    chat_template: str | None = None


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read the GGUF file at ``path`` into a :class:`GGUFCheckpoint` (float32, Hugging Face names).

    Raises :class:`CheckpointError` for a missing, truncated or corrupt file (naming the file and, where it
    applies, the tensor) and :class:`UnsupportedModelError` for architectures not in SUPPORTED_ARCHITECTURES.
    """
    path = Path(path)
    reader, arch, spec, tensors, config = _read_config(path)
    state_dict = _state_dict(path, arch, spec, config, tensors)
    return GGUFCheckpoint(config=config, state_dict=state_dict, chat_template=gguf_field(reader, "tokenizer.chat_template"))


def read_gguf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The Hugging Face ``config.json``-style dict of the GGUF file at ``path``, read from its metadata and tensor
    shapes alone (no weights are read); errors as :func:`read_gguf`."""
    return _read_config(Path(path))[-1]


def _read_config(path: Path):
    reader = _open_reader(path)
    arch = gguf_field(reader, "general.architecture")
    if arch is None:
        raise CheckpointError(f"{path}: GGUF metadata lacks general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; pronghorn reads {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    spec = _READERS[arch]
    return reader, arch, spec, tensors, _config(reader, path, arch, spec, tensors)


def load_gguf_tokenizer(path: str | os.PathLike):
    """The Hugging Face fast tokenizer embedded in the GGUF at ``path`` (with its chat template). Architectures
    transformers' GGUF reading lacks (Gemma 1: AutoTokenizer refuses the file) take the tokenizer class their
    family names (``FamilySpec.gguf_tokenizer_class``), which reads the same tokenizer fields."""
    import transformers

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises assorted types for bad metadata
        error = e
    spec = _READERS.get(gguf_field(_open_reader(path), "general.architecture"))
    tokenizer_class = getattr(transformers, spec.gguf_tokenizer_class or "", None) if spec else None
    if tokenizer_class is not None:
        try:
            return tokenizer_class.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:  # noqa: BLE001 - reported below with the first error
            error = e
    raise CheckpointError(f"{path}: cannot build the tokenizer from the GGUF metadata: {error}") from error


# --------------------------------------------------------------------------------------------- reading


def _open_reader(path: Path):
    from gguf import GGUFReader

    if not path.exists():
        raise CheckpointError(f"GGUF file {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file (expected a .gguf checkpoint)")
    try:
        return GGUFReader(path)
    except Exception as e:  # ValueError for bad magic, assorted errors for truncated files
        raise CheckpointError(f"{path} is not a readable GGUF file (corrupt or truncated?): {e}") from e


def gguf_field(reader, key: str, default: Any = None) -> Any:
    """A metadata value as plain Python (str, int, float, bool or list of them); float32 values rounded."""
    from gguf import GGUFValueType

    f = reader.fields.get(key)
    if f is None:
        return default

    def scalar(part, vtype):
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        value = part[0]
        if vtype == GGUFValueType.FLOAT32:
            return float(str(value))  # shortest repr: 1e-05, not 9.999999747378752e-06
        if vtype == GGUFValueType.BOOL:
            return bool(value)
        return value.item()

    if f.types[0] == GGUFValueType.ARRAY:
        return [scalar(f.parts[i], f.types[-1]) for i in f.data]
    return scalar(f.parts[f.data[0]], f.types[0])


def _config(reader, path: Path, arch: str, spec: FamilySpec, tensors: dict) -> dict[str, Any]:
    def need(key: str):
        value = gguf_field(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    hidden = need("embedding_length")
    n_heads = need("attention.head_count")
    n_kv = gguf_field(reader, f"{arch}.attention.head_count_kv", n_heads)
    head_dim = gguf_field(reader, f"{arch}.attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = gguf_field(reader, f"{arch}.rope.dimension_count")
    head_dim = head_dim or hidden // n_heads
    vocab = gguf_field(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        embed = tensors.get("token_embd.weight")
        if tokens is None and embed is None:
            raise CheckpointError(f"{path}: GGUF has neither {arch}.vocab_size, a vocabulary nor token_embd.weight")
        vocab = len(tokens.data) if tokens is not None else int(embed.shape[1])
    rope_theta = gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)

    config: dict[str, Any] = {
        "architectures": [spec.hf_architecture],
        "model_type": spec.model_type,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": need("context_length"),
        "rms_norm_eps": gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(reader, path, arch, tensors, rope_theta, head_dim, need("context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        **spec.gguf_config,
    }
    if spec.gguf_read is not None:
        config.update(spec.gguf_read(lambda key: gguf_field(reader, f"{arch}.{key}"), config))
    for gguf_name, hf_name in (("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        token_id = gguf_field(reader, f"tokenizer.ggml.{gguf_name}_token_id")
        if token_id is not None:
            config[f"{hf_name}_token_id"] = token_id
    return config


def _rope_scaling(reader, path: Path, arch: str, tensors: dict, rope_theta: float, head_dim: int,
                  max_pos: int) -> dict | None:
    kind = gguf_field(reader, f"{arch}.rope.scaling.type")
    factor = gguf_field(reader, f"{arch}.rope.scaling.factor")
    if kind is None and gguf_field(reader, f"{arch}.rope.scale_linear") is not None:  # older llama.cpp key
        kind, factor = "linear", gguf_field(reader, f"{arch}.rope.scale_linear")
    for table in ("rope_freqs.weight", "rope_factors_long.weight"):
        if table in tensors and kind not in (None, "none"):
            raise UnsupportedModelError(f"{path}: {table} tensor together with rope scaling {kind!r}")
    if "rope_freqs.weight" in tensors:
        return _llama3_rope_scaling(path, tensors["rope_freqs.weight"], rope_theta, head_dim)
    if "rope_factors_long.weight" in tensors:
        return _longrope_scaling(reader, path, arch, tensors, max_pos)
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor}
        extra = {
            "original_context_length": "original_max_position_embeddings",
            "attn_factor": "attention_factor",
            "yarn_beta_fast": "beta_fast",
            "yarn_beta_slow": "beta_slow",
        }
        for gguf_key, hf_key in extra.items():
            value = gguf_field(reader, f"{arch}.rope.scaling.{gguf_key}")
            if value is not None:
                scaling[hf_key] = value
        return scaling
    raise UnsupportedModelError(f"{path}: rope scaling type {kind!r} is not supported")


def _longrope_scaling(reader, path: Path, arch: str, tensors: dict, max_pos: int) -> dict:
    """Phi-3's LongRoPE from llama.cpp's ``rope_factors_long`` / ``rope_factors_short`` tensors and its original
    context; the attention factor only when it is not the one LongRoPE derives from the two lengths."""
    from gguf.quants import dequantize

    if "rope_factors_short.weight" not in tensors:
        raise CheckpointError(f"{path}: GGUF has rope_factors_long.weight but no rope_factors_short.weight")
    original = gguf_field(reader, f"{arch}.rope.scaling.original_context_length")
    if not original:
        raise CheckpointError(f"{path}: LongRoPE factors without {arch}.rope.scaling.original_context_length")
    factors = {}
    for which in ("long", "short"):
        t = tensors[f"rope_factors_{which}.weight"]
        values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)
        factors[f"{which}_factor"] = [float(str(v)) for v in values]  # shortest repr: 1.08, as config.json has
    scaling = {"rope_type": "longrope", **factors, "original_max_position_embeddings": original}
    attn = gguf_field(reader, f"{arch}.rope.scaling.attn_factor")
    scale = max_pos / original
    derived = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
    if attn is not None and not math.isclose(attn, derived, rel_tol=1e-6):  # stored in float32
        scaling["attention_factor"] = attn
    return scaling


def _llama3_rope_scaling(path: Path, tensor, rope_theta: float, head_dim: int) -> dict:
    """Recover Llama 3.x ``rope_scaling`` from llama.cpp's ``rope_freqs`` tensor (per-frequency divisors).

    llama.cpp bakes the llama3 rule into that tensor and drops the parameters; we try the values every
    Llama 3.x release uses and accept one only if it reproduces the tensor.
    """
    from gguf.quants import dequantize

    stored = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float64).reshape(-1)
    factor = float(stored.max())
    freqs = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(np.float64)
    wavelen = 2 * math.pi / freqs
    for original in (8192, 4096, 16384, 32768, 2048):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)):
            smooth = (original / wavelen - low) / (high - low)
            mid = 1 / ((1 - smooth) / factor + smooth)
            expect = np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid))
            if expect.shape == stored.shape and np.allclose(expect, stored, rtol=1e-4, atol=0):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": original,
                }
    raise UnsupportedModelError(
        f"{path}: tensor rope_freqs.weight holds rope frequency factors that match no known llama3 rope scaling"
    )


# --------------------------------------------------------------------------------------------- tensors


def _expected_tensors(spec: FamilySpec, cfg: ModelConfig, config: dict,
                      tensors: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(gguf name, HF name, numpy shape) for every tensor the model needs, in HF order: the decoder's own
    tensors (a meta-device model of the config) in the family's checkpoint layout (Phi-3's fused qkv_proj and
    gate_up_proj) under the spec's GGUF names."""
    from .decoder import DecoderForCausalLM

    with torch.device("meta"):
        model = DecoderForCausalLM(cfg)
    h = config["hidden_size"]
    stems = spec.gguf_layers
    out = [("token_embd.weight", "model.embed_tokens.weight", (config["vocab_size"], h))]
    for name, t in fuse_split(cfg, model.model.layers.state_dict().items()):
        i, module, leaf = name.split(".", 1)[0], name.split(".", 1)[1].rsplit(".", 1)[0], name.rsplit(".", 1)[1]
        out.append((f"blk.{i}.{stems[module]}.{leaf}", f"model.layers.{name}", tuple(t.shape)))
    out.append(("output_norm.weight", "model.norm.weight", (h,)))
    if "output.weight" in tensors:
        out.append(("output.weight", "lm_head.weight", (config["vocab_size"], h)))
    return out


def _state_dict(path: Path, arch: str, spec: FamilySpec, config: dict, tensors: dict) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    cfg = ModelConfig.from_hf_dict(config, source=str(path))
    expected = _expected_tensors(spec, cfg, config, tensors)
    known = {g for g, _, _ in expected} | {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
    extra = sorted(n for n in tensors if n not in known and not _IGNORED.match(n))
    if extra:
        raise UnsupportedModelError(
            f"{path}: {arch} GGUF holds tensors pronghorn does not know ({', '.join(extra[:5])}"
            f"{', ...' if len(extra) > 5 else ''}); refusing to drop weights silently"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for gguf_name, hf_name, shape in expected:
        t = tensors.get(gguf_name)
        if t is None:
            raise CheckpointError(f"{path}: tensor {gguf_name} (for {hf_name}) is missing from the GGUF file")
        found = tuple(int(d) for d in reversed(t.shape.tolist()))
        if found != shape:
            raise CheckpointError(f"{path}: tensor {gguf_name} has shape {found}, expected {shape} from the metadata")
        try:
            if t.data.nbytes != t.n_bytes:
                raise ValueError(f"holds {t.data.nbytes} bytes, expected {t.n_bytes}")
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {gguf_name} (file truncated or corrupt?): {e}") from e
        if spec.gguf_permute_qk and gguf_name.startswith("blk.") and gguf_name.split(".")[2] in ("attn_q", "attn_k"):
            heads = config["num_attention_heads"] if ".attn_q." in gguf_name else config["num_key_value_heads"]
            w = unpermute_rope_rows(w, heads)
        if cfg.parts.norm_offset and hf_name.endswith("norm.weight"):  # llama.cpp stores Gemma's (1 + w)
            w = w - np.float32(cfg.parts.norm_offset)
        if not w.flags.writeable or not w.flags.c_contiguous:
            w = np.array(w, dtype=np.float32, order="C")  # memory-mapped F32 views: copy out of the file
        state_dict[hf_name] = torch.from_numpy(w)
    return state_dict


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k rows (interleaved rope pairs -> HF's rotate-half layout)."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
