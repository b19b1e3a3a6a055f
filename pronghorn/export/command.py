"""``pronghorn export``: load a model (and adapter) and write it as a merged checkpoint, GGUF files or an adapter.

Arguments are checked before the model is loaded (unknown format or quantization, occupied output dir), so
a mistake costs no loading time; the writers build the output beside ``out`` and rename it into place.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import PronghornError
from ..files import check_output_dir
from .gguf_quant import resolve_methods

FORMATS = ("merged", "gguf", "lora")


def export(model: str = "default", out: str | Path = "", fmt: str = "merged", adapter: str | Path | None = None,
           quant: list[str] | None = None, overwrite: bool = False, base_checkpoint: str | Path | None = None,
           max_shard_size: str | None = None, dtype: str | None = None) -> list[Path]:
    """Write ``model`` (+ ``adapter``) to ``out`` in format ``fmt``; returns the written paths. ``dtype`` (merged
    only): bfloat16 (default), float16 or float32, which keeps a small fine-tune that bf16 rounding would undo."""
    from ..api import FastLanguageModel
    from ..models.adapter_format import adapter_base, load_adapter
    from ..models.loader import load_tokenizer
    from .merged import parse_size
    from .save import merged_dtype, save_pretrained_gguf, save_pretrained_merged

    if fmt not in FORMATS:
        raise PronghornError(f"unknown export format {fmt!r}; choose among {', '.join(FORMATS)}")
    if not out:
        raise PronghornError("--out is required: the directory to create")
    only = {"--quant": (quant, "gguf"), "--dtype": (dtype, "merged"), "--max-shard-size": (max_shard_size, "merged"),
            "--base-checkpoint": (base_checkpoint, "merged or gguf")}
    for flag, (value, formats) in only.items():
        if value and fmt not in formats.split(" or "):
            raise PronghornError(f"{flag} applies to --format {formats} only (got --format {fmt})")
    methods = [m.name for m in resolve_methods(quant or ["f16"])] if fmt == "gguf" else []
    if max_shard_size:
        parse_size(max_shard_size)
    if dtype:
        merged_dtype(dtype)
    check_output_dir(out, overwrite)

    lm, tokenizer = FastLanguageModel.from_pretrained(str(model))
    if adapter is not None:
        adapter = Path(adapter)
        recorded = adapter_base(adapter)
        if recorded and getattr(lm, "name_or_path", None) not in (recorded, None) and recorded != str(model):
            warnings.warn(f"{adapter / 'adapter_config.json'} was made for base {recorded!r}, exporting it on "
                          f"{model!r}; every tensor name and shape is checked", UserWarning, stacklevel=2)
        load_adapter(lm, adapter)
        if (adapter / "tokenizer_config.json").is_file():  # the training run's tokenizer (chat template, EOS)
            tokenizer = load_tokenizer(adapter)
    if fmt == "lora":
        if getattr(lm, "lora_config", None) is None:
            raise PronghornError(f"{model}: no adapter to export as lora; pass --adapter DIR or an adapter dir")
        return [save_pretrained_merged(lm, out, tokenizer, "lora", overwrite=overwrite)]
    if fmt == "merged":
        return [save_pretrained_merged(lm, out, tokenizer, "merged_16bit", overwrite=overwrite,
                                       max_shard_size=max_shard_size, dtype=dtype, base_checkpoint=base_checkpoint)]
    return save_pretrained_gguf(lm, out, tokenizer, methods, overwrite=overwrite, base_checkpoint=base_checkpoint)
