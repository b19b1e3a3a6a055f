"""The memory plan of a LoRA or QLoRA training step, previewed without a GPU and without the weights.

Will an 8B QLoRA run of 1 x 8192 tokens fit a 16 GB card, and what will it recompute or offload? The planner
(models/memory_plan.py) answers from byte sizes alone, so the model is built on the meta device (no memory, no
values) from its config, the adapters are attached as ``get_peft_model`` would, and the step's sizes are counted
as on a GPU at the first step: bf16 weights (QLoRA's projections at NF4's stored size), the optimizer's state still
to come, the input table free to move to the host, replays and kept layers as CUDA graphs. The plan is the one
``get_peft_model(..., max_memory=...)`` makes for that batch shape on a GPU with that budget; its estimate was
checked against peaks measured on H100 and H200 (tests/models/test_memory_plan_calibration.py). ``pronghorn plan``
prints it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..errors import CheckpointError
from .config import ModelConfig
from .decoder import DecoderForCausalLM
from .linear import Linear
from .lora import LoRAConfig, attach_lora
from .memory_plan import MemoryPlan, StepSizes, make_plan, parse_budget, step_sizes
from .recompute import checkpoint_mode
from .tiled_mlp import tiled_mlp_mode

# bitsandbytes' NF4 layout per weight: a 4-bit code, a uint8 absmax per 64 weights, an fp32 scale per 256 absmaxes
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


def read_config(source: str | Path, token: str | None = None, revision: str | None = None) -> ModelConfig:
    """The model config of ``source``: "default", a checkpoint directory or its ``config.json``, a .gguf file
    (its metadata), a PEFT adapter directory (its base's), or a hub id (its ``config.json`` alone is fetched)."""
    from .adapter_format import adapter_base, is_adapter_dir
    from .default_model import DEFAULT_NAMES
    from .loader import check_hub_id

    name = str(source)
    if name in DEFAULT_NAMES:
        from .default_model import default_model_dir

        return ModelConfig.from_file(default_model_dir() / "config.json")
    path = Path(name).expanduser()
    if path.is_dir() and is_adapter_dir(path):
        base = adapter_base(path)
        if not base:
            raise CheckpointError(f"{path / 'adapter_config.json'}: field 'base_model_name_or_path' is empty")
        return read_config(base, token, revision)
    if path.is_dir():
        return ModelConfig.from_file(path / "config.json")
    if path.is_file() and path.suffix == ".gguf":
        from .gguf_loading import read_gguf_config

        return ModelConfig.from_hf_dict(read_gguf_config(path), source=str(path))
    if path.is_file():
        return ModelConfig.from_file(path)
    check_hub_id(name)
    try:
        from huggingface_hub import hf_hub_download

        return ModelConfig.from_file(hf_hub_download(name, "config.json", revision=revision, token=token))
    except CheckpointError:
        raise
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise CheckpointError(f"{name}: could not fetch config.json from the Hugging Face hub ({type(e).__name__}: "
                              f"{e}); pass a local checkpoint directory, config.json or .gguf file") from None


def meta_step_sizes(cfg: ModelConfig, batch: int, seq_len: int, lora: LoRAConfig | None = None,
                    load_in_4bit: bool = False) -> StepSizes:
    """The planner's sizes of a step of ``batch`` x ``seq_len`` tokens, for ``cfg`` with ``lora``'s adapters (default:
    r=16 on the seven projections), as a GPU would show them at the first step (module docstring)."""
    with torch.device("meta"):
        model = DecoderForCausalLM(cfg, dtype=torch.bfloat16)
    model.tie_weights()
    attach_lora(model, lora or LoRAConfig())
    meta = torch.device("meta")
    sizes = step_sizes(model.model, batch, seq_len, torch.bfloat16, meta, model.lm_head)
    if load_in_4bit:  # the projections' bases stored as NF4, dense again only inside a layer's backward or replay
        proj = sum(m.weight.numel() for m in model.modules() if isinstance(m, Linear))
        dense = [m.weight.numel() * 2 for m in model.model.layers[0].modules() if isinstance(m, Linear)]
        sizes = replace(sizes, resident=int(sizes.resident - proj * (2 - NF4_BYTES)), dense_layer=sum(dense),
                        backward_extra=sizes.backward_extra + max(dense))
    table = model.model.embed_tokens.weight.numel() * 2  # on a GPU the frozen table may move to the host
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    return replace(sizes, untied_table=0 if tied else table, tied_table=table if tied else 0)


def preview_plan(cfg: ModelConfig, batch: int, seq_len: int, max_memory=None, lora: LoRAConfig | None = None,
                 load_in_4bit: bool = False, mode: str = "auto", replay: str = "auto", graphs: bool = True,
                 tiled_mlp="auto", mlp_chunk: int = 8192) -> MemoryPlan:
    """The plan of that step under ``max_memory`` (bytes, "16GiB", "24GB"; None: unlimited) on a CUDA GPU
    (``graphs``: replays and kept layers may run as CUDA graphs, as they do there). ``mode``: the
    ``use_gradient_checkpointing`` setting ("auto", True, False, "unsloth", or on | offload | off); ``tiled_mlp``
    and ``mlp_chunk``: the tiled MLP's (auto | on | off, tokens a chunk). The optimizer's state is counted as
    AdamW's two fp32 moments (8-bit AdamW keeps less). Raises the planner's error, naming the smallest budget that
    fits, when nothing does."""
    return plan_for_sizes(meta_step_sizes(cfg, batch, seq_len, lora, load_in_4bit), batch, seq_len, max_memory,
                          mode=mode, replay=replay, graphs=graphs, tiled_mlp=tiled_mlp, mlp_chunk=mlp_chunk)


def plan_for_sizes(sizes: StepSizes, batch: int, seq_len: int, max_memory=None, source: str = "max_memory",
                   mode: str = "auto", replay: str = "auto", graphs: bool = True, tiled_mlp="auto",
                   mlp_chunk: int = 8192) -> MemoryPlan:
    """:func:`preview_plan` from the step's sizes (``source``: what the budget is called in the plan's summary);
    the planner's settings as a model on a GPU passes them (``DecoderModel.plan_step``)."""
    return make_plan(sizes, parse_budget(max_memory), source, (batch, seq_len), mode=checkpoint_mode(mode),
                     tiled_mlp=tiled_mlp_mode(tiled_mlp), mlp_chunk=mlp_chunk, replay=replay, graphs=graphs,
                     kept_graphs=graphs)
