"""Data-parallel training over ``torch.distributed`` (DDP or FSDP2), launched by ``torchrun`` or ``accelerate``.

One process per GPU. The launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; without them everything here is a no-op and training runs in one process as before.

- **Data**: every rank computes the same global step (same seeded shuffle) and takes a contiguous share of it
  (:func:`shard_examples`), padded with empty filler examples so that every rank runs the same number of
  micro-batches (collectives must line up).
- **Loss normalisation**: the trained-token count is summed over ranks and accumulation steps; each rank's
  loss is its token sum divided by ``global_tokens / world_size``, so the gradient average that DDP/FSDP take
  equals the gradient of ``all tokens' loss sum / global_tokens``: 2 ranks x batch B == 1 rank x batch 2B.
- **DDP** (LoRA/QLoRA): every rank holds the frozen base; only parameters with ``requires_grad`` (the
  adapters) are bucketed and all-reduced, overlapped with backward, once per optimizer step (``no_sync`` on
  the other micro-batches). ``find_unused_parameters`` stays off (all adapters are used each step) and
  ``static_graph`` stays off (it is unsafe with checkpointed layers whose recomputation re-fires hooks).
- **FSDP2** (``fully_shard`` per decoder layer, then the root): the base weights are sharded. LoRA adapters
  are left out of FSDP (``ignored_params``): they are tiny, stay replicated, and their gradients are all-reduced
  in buckets by :class:`_ReplicatedGradReducer`, so the adapter, the optimizer state and the checkpoints are
  ordinary tensors on every rank. A QLoRA base's NF4 bytes are sharded too (as frozen uint8 parameters).
  For full fine-tuning FSDP manages (and reduce-scatters) every parameter, checkpoints are sharded (DCP,
  train/sharded_checkpoint.py), and train/fsdp_gather.py gathers full tensors onto rank 0 for export.
- **Failures**: the process group has a finite timeout, and :func:`failure_guard` turns a lost peer into a
  clear :class:`LostPeersError` (the CLI then ends with :func:`exit_now`); checkpoints are written atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LostPeersError, PronghornError
from ..models.precision import default_dtype
from ..kernels import IGNORE_INDEX
from .metrics import MetricsLog

STRATEGIES = ("auto", "ddp", "fsdp")
FILLER = {"input_ids": [0], "labels": [IGNORE_INDEX], "position_ids": [0]}  # one masked token: no loss, no gradient
_LAUNCH_HINT = "launch with `torchrun --nproc_per_node N ...` or `accelerate launch ...`"


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, as the launcher's environment variables say."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _int_var(environ, name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise PronghornError(f"environment variable {name}={raw!r} is not an integer ({_LAUNCH_HINT})") from None


def env_from_os(environ=None) -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun and by accelerate launch)."""
    environ = os.environ if environ is None else environ
    world = _int_var(environ, "WORLD_SIZE", 1)
    rank = _int_var(environ, "RANK", 0)
    local = _int_var(environ, "LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise PronghornError(f"RANK={rank} is not within WORLD_SIZE={world} ({_LAUNCH_HINT})")
    return DistEnv(rank, world, local)


def init_distributed(timeout_s: float = 1800.0, backend: str | None = None) -> DistEnv:
    """Join the process group the launcher set up (NCCL on CUDA, gloo on CPU) with a finite timeout, and
    select this rank's GPU. Returns a single-process :class:`DistEnv` when not launched distributed."""
    env = env_from_os()
    if not env.distributed:
        return env
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size:
            raise PronghornError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE={env.world_size}")
        return env
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise PronghornError(f"WORLD_SIZE={env.world_size} but {', '.join(missing)} not set; {_LAUNCH_HINT}")
    cuda = torch.cuda.is_available()
    if cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise PronghornError(f"LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(env.local_rank)
    backend = backend or ("nccl" if cuda else "gloo")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=env.device if backend == "nccl" else None)
    return env


def exit_now(code: int) -> None:
    """End this process after a :class:`LostPeersError`: flush the output and skip the interpreter's teardown,
    whose destruction of the broken process group's still-running threads can abort the process (exit -6,
    "terminate called without an active exception") instead of returning ``code``."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _comm_device(env: DistEnv) -> torch.device:
    return env.device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: Sequence[float], env: DistEnv) -> list[float]:
    """Sum a few numbers over ranks (float64 on the wire: token counts stay exact up to 2**53)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device(env))
    dist.all_reduce(t)
    return t.tolist()


def all_gather_rows(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Every rank's [n, ...] tensor (the same shape on each) concatenated in rank order; ``t`` in one process."""
    if not env.distributed:
        return t
    local = t.to(_comm_device(env)).contiguous()
    parts = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(t.device)


def shard_examples(examples: Sequence[Any], rank: int, world_size: int, batch_size: int,
                   filler: Any = FILLER) -> list:
    """This rank's contiguous share of one global step's ``examples`` (or packed rows).

    Every rank gets the same number of micro-batches of ``batch_size``: a rank whose share is shorter (the
    last, partial step of an epoch) is topped up with ``filler`` rows, which carry no trained token."""
    per_rank = -(-len(examples) // world_size)
    mine = list(examples[rank * per_rank:(rank + 1) * per_rank])
    micro = -(-per_rank // batch_size)
    if -(-len(mine) // batch_size) < micro:
        mine += [filler] * ((micro - 1) * batch_size + 1 - len(mine))
    return mine


def load_placement(strategy: str, env: DistEnv, device: str | None, dtype: torch.dtype | None):
    """(device, dtype) to load the base model with on this rank: its own GPU for DDP; the CPU for FSDP,
    which then moves only this rank's shards to the GPU. bf16 by default when the ranks' GPUs have it, else fp16."""
    if not env.distributed:
        return device, dtype
    if device in (None, "cuda"):
        device = "cpu" if strategy == "fsdp" else str(env.device)
    if dtype is None and env.device.type == "cuda":
        dtype = default_dtype(env.device)  # bf16, or fp16 on a GPU without it (2 x T4)
    return device, dtype


def resolve_strategy(strategy: str, model: nn.Module) -> str:
    if strategy not in STRATEGIES:
        raise PronghornError(f"distributed must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":  # adapters: every rank holds the base; full fine-tuning: shard it
        return "ddp" if getattr(model, "lora_config", None) is not None else "fsdp"
    return strategy


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise PronghornError(f"{type(model).__name__} has no .model.layers; FSDP shards per decoder layer")
    return list(layers)


def fsdp_shards_integer_parameters() -> bool:
    """Whether this torch's FSDP2 can hold a frozen integer parameter: torch 2.11 and older turn every shard
    into ``nn.Parameter(dtensor)`` with the default ``requires_grad=True``, which torch refuses for uint8
    ("only Tensors of floating point dtype can require gradients"); 2.12 passes the original flag."""
    return torch.__version__ >= "2.12"


def _nf4_storage_as_frozen_parameters(model: nn.Module) -> None:
    """Let FSDP shard a QLoRA base: ``fully_shard`` shards parameters only (buffers are replicated), so the
    packed NF4 bytes and block statistics of every :class:`NF4Weight` become frozen uint8/int32 parameters.
    FSDP then shards them on dim 0 like any frozen weight and all-gathers them (as bytes, alongside the layer's
    other parameters) before the layer runs; the layer reads ``weight.packed`` as before. Names, and so the
    state dict, do not change; the tiny code tables stay buffers. Where torch's FSDP cannot hold integer
    parameters (:func:`fsdp_shards_integer_parameters`) the NF4 bytes stay buffers, replicated on every rank:
    the same numbers, a 4-bit base's memory on each GPU, said once on rank 0."""
    from ..kernels.nf4 import NF4Weight

    if not fsdp_shards_integer_parameters():
        if any(isinstance(m, NF4Weight) for m in model.modules()) and dist.get_rank() == 0:
            print(f"FSDP: torch {torch.__version__} cannot shard the 4-bit base's integer bytes (torch >= 2.12 "
                  "can); they are replicated on every rank, the rest of each layer is sharded", flush=True)
        return
    for m in model.modules():
        if isinstance(m, NF4Weight):
            for name in ("packed", "absmax"):
                if name in m._buffers:
                    m.register_parameter(name, nn.Parameter(m._buffers.pop(name), requires_grad=False))


class _ReplicatedGradReducer:
    """All-reduce (average) the gradients of parameters FSDP leaves replicated, in buckets launched as soon as
    a bucket's last gradient is accumulated, so communication overlaps the rest of backward."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], world_size: int, bucket_mb: float = 25.0):
        self.world_size, self.enabled = world_size, True
        self.buckets: list[list[tuple[str, nn.Parameter]]] = []
        size, key = 0.0, None
        for name, p in reversed(named_params):  # backward visits the last layers first
            k = (p.dtype, p.device)
            if not self.buckets or size >= bucket_mb * 2**20 or k != key:
                self.buckets.append([])
                size, key = 0.0, k
            self.buckets[-1].append((name, p))
            size += p.numel() * p.element_size()
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for _, p in b}
        self._reset()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for _, p in named_params]

    def _reset(self) -> None:
        self._ready = [0] * len(self.buckets)
        self._works: list = []
        self._queued = False

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.enabled:
            return
        if not self._queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._queued = True
        i = self._bucket_of[id(p)]
        self._ready[i] += 1
        if self._ready[i] == len(self.buckets[i]):
            grads = [q.grad for _, q in self.buckets[i]]
            flat = torch._utils._flatten_dense_tensors(grads).div_(self.world_size)
            self._works.append((i, flat, dist.all_reduce(flat, async_op=True)))

    def _finish(self) -> None:
        for i, flat, work in self._works:
            work.wait()
            grads = [q.grad for _, q in self.buckets[i]]
            for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(reduced)
        incomplete = [n for i, b in enumerate(self.buckets) if self._ready[i] != len(b) for n, _ in b]
        self._reset()
        if incomplete:
            raise PronghornError(f"trainable parameters got no gradient in this backward (among {incomplete[:4]}); "
                                 "every trainable parameter must take part in every forward")


class DataParallel:
    """The model as the training loop drives it on one or many ranks.

    ``module`` is what to call for the forward; ``model`` stays the unwrapped model (names, saving)."""

    def __init__(self, model: nn.Module, strategy: str = "auto", env: DistEnv | None = None,
                 bucket_mb: float = 25.0):
        self.model, self.env = model, env or env_from_os()
        self.module: nn.Module = model
        self.strategy = "none"
        self._reducer: _ReplicatedGradReducer | None = None
        if not self.env.distributed:
            return
        if not dist.is_initialized():
            raise PronghornError(f"WORLD_SIZE={self.env.world_size} but no process group; call init_distributed()")
        self.strategy = resolve_strategy(strategy, model)
        if self.strategy == "ddp":
            self.module = self._ddp(model, bucket_mb)
        else:
            self._fsdp(model, bucket_mb)

    def _ddp(self, model: nn.Module, bucket_mb: float) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        model.to(self.env.device)
        cuda = self.env.device.type == "cuda"
        return DistributedDataParallel(
            model, device_ids=[self.env.local_rank] if cuda else None, bucket_cap_mb=bucket_mb,
            gradient_as_bucket_view=True, find_unused_parameters=False, static_graph=False,
        )

    def _fsdp(self, model: nn.Module, bucket_mb: float) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        adapters = getattr(model, "lora_config", None) is not None
        replicated = [(n, p) for n, p in model.named_parameters() if p.requires_grad] if adapters else []
        ignored = {p for _, p in replicated}
        for _, p in replicated:  # FSDP neither shards nor moves ignored parameters
            p.data = p.data.to(self.env.device)
        if replicated:  # the same adapter on every rank, whatever each rank's initialisation was
            for _, p in replicated:
                dist.broadcast(p.data, 0)
        _nf4_storage_as_frozen_parameters(model)
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh, ignored_params=ignored)
        fully_shard(model, mesh=mesh, ignored_params=ignored)
        if replicated:
            self._reducer = _ReplicatedGradReducer(replicated, self.env.world_size, bucket_mb)

    # --- the training loop's hooks ---
    def shard(self, examples: Sequence[Any], batch_size: int) -> list:
        if not self.env.distributed:
            return list(examples)
        return shard_examples(examples, self.env.rank, self.env.world_size, batch_size)

    def loss_normalizer(self, local_tokens: int) -> int | float:
        """What to pass as ``num_items_in_batch``: global trained tokens / world size (see module doc)."""
        if not self.env.distributed:
            return local_tokens
        total = int(all_reduce_sum([local_tokens], self.env)[0])
        return total / self.env.world_size

    def reduce_stats(self, loss: float, tokens: int) -> tuple[float, int]:
        """The step's loss over all ranks' tokens and the tokens all ranks saw."""
        if not self.env.distributed:
            return loss, tokens
        total_loss, total_tokens = all_reduce_sum([loss, tokens], self.env)
        return total_loss / self.env.world_size, int(total_tokens)

    @contextlib.contextmanager
    def grad_sync(self, sync: bool) -> Iterator[None]:
        """Around a micro-batch's forward: reduce gradients only when ``sync`` (the step's last micro-batch).
        Reducing on every micro-batch would also be correct (averaging is linear), only slower."""
        if self.strategy == "ddp" and not sync:
            with self.module.no_sync():
                yield
            return
        if self._reducer is not None:
            self._reducer.enabled = sync
        yield

    def forward(self, **batch):
        """``module(**batch)``; a micro-batch with no trained token (a filler) still runs backward through
        every adapter (with a zero loss), so all ranks take part in the same gradient reductions."""
        labels = batch.get("labels")
        if self.env.distributed and labels is not None and not bool((labels[..., 1:] != IGNORE_INDEX).any()):
            out = self.module(**{**batch, "return_logits": True, "logits_to_keep": 1})  # [B, 1, vocab] only
            out["loss"] = out.logits.float().sum() * 0.0
            return out
        return self.module(**batch)

    def metrics_log(self, path, resume: bool) -> MetricsLog:
        return MetricsLog(path, resume) if self.env.is_main else _ReadOnlyMetricsLog(path, resume)

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def world_size(self) -> int:
        return self.env.world_size


class _ReadOnlyMetricsLog(MetricsLog):
    """What ranks other than 0 hold: the rows in memory (for resume), nothing written."""

    def __init__(self, path, resume: bool = False):
        self.path = Path(path)
        self.rows = []
        if resume and self.path.is_file():
            self.rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def log(self, row: dict) -> None:
        self.rows.append(row)

    def truncate_after(self, step: int) -> None:
        self.rows = [r for r in self.rows if r.get("step", 0) <= step]

    def plot_loss(self, png):
        return None


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state as full CPU tensors on rank 0 (empty elsewhere), gathered from FSDP shards;
    a plain ``state_dict`` for an unsharded model. Every rank must call it (it is a collective)."""
    from .fsdp_gather import full_state_dict as gather

    return gather(model)


_COMM_ERRORS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "closed", "broken pipe")


@contextlib.contextmanager
def failure_guard(env: DistEnv, output_dir=None) -> Iterator[None]:
    """Around a distributed run: turn a collective that failed because another rank died or hung into a clear
    error, and leave the process group when the run succeeded."""
    try:
        yield
        if env.distributed:
            shutdown()
    except PronghornError:
        raise
    except (dist.DistError, RuntimeError) as e:
        text = str(e).lower()
        if not env.distributed or not (isinstance(e, dist.DistError) or any(w in text for w in _COMM_ERRORS)):
            raise
        where = ""
        if output_dir is not None:
            from .checkpoint import list_checkpoints

            found = list_checkpoints(Path(output_dir))
            where = (f"; the last complete checkpoint is {found[-1]} (resume_from_checkpoint: latest)" if found
                     else f"; no checkpoint was saved in {output_dir}")
        raise LostPeersError(
            f"rank {env.rank} of {env.world_size}: lost contact with the other ranks during a collective "
            f"(another rank probably failed or stopped; see its log){where}. Cause: {str(e).splitlines()[0]}"
        ) from e
