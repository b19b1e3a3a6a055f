"""Kernel tests run on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set in tests/conftest.py)."""

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _gpu_bf16_rounding(monkeypatch):
    """Make the interpreter's fp32 -> bf16 conversion round to nearest even, as GPUs (and torch) do."""
    import triton.language as tl
    import triton.runtime.interpreter as interp

    if not hasattr(interp, "_convert_float"):  # another Triton: nothing to patch (harmless on a GPU)
        return
    original = interp._convert_float

    def convert(data, src, dst, rounding_mode):
        if not (src == tl.float32 and dst == tl.bfloat16 and rounding_mode != interp._ir.ROUNDING_MODE.RTZ):
            return original(data, src, dst, rounding_mode)
        bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(np.isnan(data), (out & 0x8000) | 0x7FC0, out).astype(np.uint16)

    monkeypatch.setattr(interp, "_convert_float", convert)


@pytest.fixture(autouse=True)
def _interpreter_loop_bounds(monkeypatch):
    """Triton 3.6's interpreter (the lowest supported, torch 2.11's) turns a loop bound into an int with
    ``int(array)``, which numpy >= 2.4 refuses for its one-element arrays ("only 0-dimensional arrays can be
    converted"): any ``range(lo, hi)`` with runtime bounds fails there. Triton 3.7+ squeezes first; do the same.
    Only the interpreter is affected (a GPU compiles the loop)."""
    import inspect

    import triton.runtime.interpreter as interp

    patch = getattr(interp, "_patch_lang_tensor", None)
    if patch is None or "int(self.handle.data))" not in inspect.getsource(patch):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    monkeypatch.setattr(interp, "_patch_lang_tensor", patched)
