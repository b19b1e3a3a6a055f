"""The adapters' matmul operands (``A`` and ``s * B`` in the compute dtype) kept across training steps and made
again in place, all together, with a few for-each kernels when the adapters change.

Each fast LoRA op casts its adapter matrices to the compute dtype and scales ``B`` before its matmuls (three
small kernels per projection, a stacked ``A`` for the q/k/v and gate/up ops): about 19 of the 46 kernels of a
bf16 LoRA layer's forward (``benchmarks/launch_census.py``). Their values change only when the adapters do, once
per optimizer step. A model in training opens its :class:`StepOperands` around each forward
(``DecoderModel.forward``): the first forward makes each entry as a plain call would; a later forward, after an
optimizer step or any in-place write to an adapter, writes every stale entry again in place, with one
``_foreach_copy_`` (the casts, into the same tensors: a stacked ``A`` is written row block by row block) and one
``_foreach_mul_`` per scaling, instead of ~19 launches a layer. Recomputed layers and tiled MLPs take the same
store for their replays (kernels/adapter_operands.open_store).

Exact: an entry's values are those a fresh cast gives, bit for bit (a cast, then the product with the scaling in
the compute dtype, the same two roundings). It is remade when an optimizer steps (a global step post-hook: 8-bit
optimizers write the adapters without bumping their versions) or when the version of one of its adapters moved;
an in-place write that neither bumps a version nor goes through a ``torch.optim.Optimizer`` is not seen (call
:meth:`StepOperands.clear` after one). An entry no forward took since the last forward is dropped (replaced or
merged adapters), and so is one whose adapters' data moved (``Module.to``, an assignment to
``.data``). Writing an entry in place bumps its version, so a backward through a graph recorded before
the adapters changed fails loudly instead of using new values.

``DecoderModel.step_operands = None``: no store, each op makes its operands (the ablation of
``benchmarks/memory_budget.py --levers off``).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_STEPS = [0]  # optimizer steps taken in this process (any torch.optim.Optimizer)
_HOOK: list = []


def optimizer_steps() -> int:
    """How many ``torch.optim.Optimizer`` steps ran since the first store was made."""
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(_counted))
    return _STEPS[0]


def _counted(optimizer, args, kwargs) -> None:
    _STEPS[0] += 1


class _Entry:
    __slots__ = ("sources", "versions", "places", "value", "parts", "used")

    def __init__(self, sources: tuple, value, parts: list):
        self.sources, self.value, self.parts, self.used = sources, value, parts, True
        self.versions, self.places = _versions(sources), _places(sources)


def _versions(sources) -> tuple:
    return tuple(t._version for t in sources)


def _places(sources) -> tuple:
    """Where the sources' data is: an assignment to ``.data`` (``Module.to``, a load) moves it without a version."""
    return tuple((t.data_ptr(), t.device, t.dtype) for t in sources)


class StepOperands(dict):
    """The operands of every adapter a training forward used, kept until the adapters change and then written
    again in place (see the module docstring). Entries: ``(kind, *ids of the sources) -> _Entry``."""

    def __init__(self):
        super().__init__()
        self.steps: int | None = None

    def take(self, key: tuple, sources: tuple, make, parts):
        """The entry for ``key`` (made by ``make()`` when missing; ``parts(value)``: its (operand, source,
        scaling) pieces, for a remake in place)."""
        entry = self.get(key)
        if entry is not None and all(a is b for a, b in zip(entry.sources, sources)):
            entry.used = True
            return entry.value
        value = make()
        self[key] = _Entry(sources, value, [p for p in parts(value) if not _same_memory(p[0], p[1])])
        return value

    def begin(self) -> None:
        """A training forward starts: drop the entries the last forward did not take, remake the stale ones."""
        steps = optimizer_steps()
        stale = []
        for key, entry in list(self.items()):
            if not entry.used or entry.places != _places(entry.sources):
                del self[key]
                continue
            entry.used = False
            if steps != self.steps or entry.versions != _versions(entry.sources):
                stale.append(entry)
        self.steps = steps
        remake(stale)

    def nbytes(self) -> int:
        """Device bytes the entries hold beyond their sources."""
        return sum(p[0].numel() * p[0].element_size() for e in self.values() for p in e.parts)


class GraphOperands(StepOperands):
    """The store of a captured decode graph (infer/static_decode.py): its entries keep their tensors (the graph
    reads them), and :meth:`renew` writes every one again in place, whatever the versions say (an 8-bit
    optimizer's kernel bumps none); taken under inference mode too."""

    def renew(self) -> None:
        """The adapters may have changed since the last generate call (a training step)."""
        remake(list(self.values()))


def remake(entries) -> None:
    """Write the entries' operands again from their sources: one for-each copy (the casts), then one for-each
    product per scaling (in the compute dtype, as ``scaled_b``)."""
    if not entries:
        return
    dst, src, scaled = [], [], defaultdict(list)
    with torch.no_grad():
        for entry in entries:
            for operand, source, scaling in entry.parts:
                dst.append(operand)
                src.append(source)
                if scaling != 1.0:
                    scaled[scaling].append(operand)
            entry.versions = _versions(entry.sources)
        torch._foreach_copy_(dst, src)
        for scaling, operands in scaled.items():
            torch._foreach_mul_(operands, scaling)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` is ``b``'s memory in ``b``'s dtype (a cast to the adapter's own dtype): nothing to remake."""
    return a.dtype == b.dtype and a.data_ptr() == b.data_ptr() and a.shape == b.shape


@contextlib.contextmanager
def training_operands(store: StepOperands | None):
    """A training forward under ``store`` (None: no store, each op makes its operands)."""
    if store is None:
        yield
        return
    from .adapter_operands import operands_kept

    store.begin()
    with operands_kept(store):
        yield
