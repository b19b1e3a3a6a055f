"""A Hugging Face fast tokenizer as GGUF ``tokenizer.ggml.*`` metadata (what llama.cpp and Ollama read).

Two vocabulary kinds, as llama.cpp's converter writes them:
- byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen2): ``model = "gpt2"``, tokens, merges, token types and a
  ``pre`` name for the pre-tokenizer split (recognised from ``tokenizer.json``; "default" with a warning when
  the split is not one llama.cpp knows by name);
- SentencePiece-style (Llama 2, Mistral: BPE with byte fallback, or Unigram): ``model = "llama"``, tokens,
  scores (Unigram: the model's log-probabilities; BPE: minus the rank of the merge that makes the token, so
  llama.cpp's highest-score-first merging reproduces the BPE order) and token types (BYTE for ``<0xNN>``).
Special token ids (bos/eos/unk/pad) and add_bos/add_eos come from the tokenizer's behaviour; the chat
template is written as ``tokenizer.chat_template``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

from ..errors import PronghornError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
_SPLITS = {  # tokenizer.json Split regex (followed by a regex-free ByteLevel) -> llama.cpp pre-tokenizer name
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
    _GPT2_SPLIT: "gpt-2",
}


@dataclass
class GGUFVocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / padding -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def write(self, writer) -> None:
        """Add every field to a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.merges:
            writer.add_token_merges(self.merges)
        for name, token_id in self.special_ids.items():
            writer.add_uint32(f"tokenizer.ggml.{name}_token_id", token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def gguf_vocab(tokenizer, n_vocab: int) -> GGUFVocab:
    """The GGUF vocabulary of ``tokenizer`` padded to the model's ``n_vocab`` embedding rows."""
    if tokenizer is None:
        raise PronghornError("a tokenizer is needed to write a GGUF (pass the tokenizer from from_pretrained)")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PronghornError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; GGUF export "
                             "reads tokenizer.json -- load the tokenizer with AutoTokenizer (use_fast=True)")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind == "BPE" and not model.get("byte_fallback"):
        vocab = _bpe_vocab(spec, model)
    elif kind in ("BPE", "Unigram"):
        vocab = _sentencepiece_vocab(spec, model, tokenizer)
    else:
        raise PronghornError(f"tokenizer model {kind!r} cannot be written to GGUF (byte-level BPE, "
                             "SentencePiece-style BPE and Unigram can)")
    _pad(vocab, n_vocab)
    for name, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                       ("padding", "pad_token_id")):
        token_id = getattr(tokenizer, attr, None)
        if isinstance(token_id, int) and 0 <= token_id < n_vocab:
            vocab.special_ids[name] = token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    vocab.add_bos = bos is not None and len(probe) > len(plain) and probe[0] == bos
    vocab.add_eos = eos is not None and len(probe) > len(plain) and probe[-1] == eos
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    vocab.chat_template = template if isinstance(template, str) else None
    return vocab


def _by_id(spec: dict, vocab_items) -> tuple[list[str | None], dict[int, dict]]:
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    size = max([i for _, i in vocab_items] + list(added) + [-1]) + 1
    tokens: list[str | None] = [None] * size
    for text, i in vocab_items:
        tokens[i] = text
    for i, t in added.items():
        tokens[i] = t["content"]
    return tokens, added


def _bpe_vocab(spec: dict, model: dict) -> GGUFVocab:
    tokens, added = _by_id(spec, model["vocab"].items())
    types = [NORMAL] * len(tokens)
    for i, t in added.items():
        types[i] = CONTROL if t.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return GGUFVocab("gpt2", _fill_holes(tokens, types), types, pre=_pre_name(spec.get("pre_tokenizer")),
                     merges=merges)


def _sentencepiece_vocab(spec: dict, model: dict, tokenizer) -> GGUFVocab:
    if model["type"] == "Unigram":
        items = [(piece, i) for i, (piece, _) in enumerate(model["vocab"])]
        given = [float(score) for _, score in model["vocab"]]
    else:
        items = list(model["vocab"].items())
        given = None
    tokens, added = _by_id(spec, items)
    scores = [0.0] * len(tokens)
    if given is not None:
        scores[: len(given)] = given
    else:
        ids = model["vocab"]
        for rank, m in enumerate(model.get("merges") or []):
            left, right = m.split(" ", 1) if isinstance(m, str) else m
            merged = ids.get(left + right)
            if merged is not None and scores[merged] == 0.0:
                scores[merged] = -float(rank + 1)
    types = [NORMAL] * len(tokens)
    for i, text in enumerate(tokens):
        if text is not None and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[i] = BYTE
    unk = getattr(tokenizer, "unk_token_id", None)
    for i, t in added.items():
        types[i] = CONTROL if t.get("special") else USER_DEFINED
    if isinstance(unk, int) and 0 <= unk < len(types):
        types[unk] = UNKNOWN
    return GGUFVocab("llama", _fill_holes(tokens, types), types, pre="default", scores=scores,
                     add_space_prefix=_adds_space_prefix(spec))


def _fill_holes(tokens: list[str | None], types: list[int]) -> list[str]:
    out = []
    for i, text in enumerate(tokens):
        if text is None:
            text, types[i] = f"[PAD{i}]", UNUSED
        out.append(text)
    return out


def _pad(vocab: GGUFVocab, n_vocab: int) -> None:
    n = len(vocab.tokens)
    if n > n_vocab:
        raise PronghornError(
            f"the tokenizer has {n} tokens but the model's embedding has {n_vocab} rows; resize the model "
            "(model.resize_token_embeddings(len(tokenizer))) and train, or pass the model's own tokenizer"
        )
    for i in range(n, n_vocab):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(0.0)


def _pre_name(pre: dict | None) -> str:
    steps = (pre.get("pretokenizers") if pre and pre.get("type") == "Sequence" else [pre]) if pre else []
    shape = [s.get("type") for s in steps]
    if shape == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if shape == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if shape == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _SPLITS:
            return _SPLITS[regex]
    warnings.warn(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one llama.cpp knows by name; "
                  "writing tokenizer.ggml.pre='default' (llama.cpp may split text slightly differently)",
                  UserWarning, stacklevel=3)
    return "default"


def _adds_space_prefix(spec: dict) -> bool:
    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
                return True
            if node.get("type") == "Metaspace":
                scheme = node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never")
                return scheme != "never"
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(spec.get("normalizer")) or walk(spec.get("pre_tokenizer"))
