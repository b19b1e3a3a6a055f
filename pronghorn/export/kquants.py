"""Q4_K and Q6_K quantizers (llama.cpp's k-quant block formats), vectorized over all blocks with numpy.

``gguf`` (gguf-py) reads these formats but cannot write them, so pronghorn writes them itself. The search
for each sub-block's scale follows the published k-quant scheme: a weighted least-squares fit over a small
grid of candidate inverse scales, keeping the candidate with the least weighted error. Results are checked
by dequantizing with ``gguf.quants.dequantize`` (tests/export/test_kquants.py).

Block layouts (256 values per super-block, little-endian):
- Q4_K (144 bytes): f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128 bytes of
  4-bit codes. Value = d * scale_j * q - dmin * min_j.
- Q6_K (210 bytes): 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales (sub-blocks of 16), f16 d.
  Value = d * scale_j * (q - 32).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
Q4_K_BYTES = 144
Q6_K_BYTES = 210
_EPS = 1e-15


def _rows_to_blocks(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"k-quants need rows that are a multiple of {QK_K} values, got {x.shape[-1]}")
    return x.reshape(-1, QK_K)


def _fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int, steps: int = 20, rmin: float = -1.0,
                   rdelta: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``x`` [n, k]: (scale >= 0, offset <= 0) so that x ~ scale * q + offset, q in 0..nmax."""
    lo = np.minimum(x.min(axis=1), 0.0)
    hi = x.max(axis=1)
    span = hi - lo
    flat = span <= _EPS
    span = np.where(flat, 1.0, span)
    sum_w = w.sum(axis=1)
    sum_x = (w * x).sum(axis=1)

    scale = span / nmax
    offset = lo.copy()
    q = np.clip(np.rint((x - lo[:, None]) / scale[:, None]), 0, nmax)
    best = (w * (scale[:, None] * q + offset[:, None] - x) ** 2).sum(axis=1)
    for step in range(steps + 1):
        iscale = (rmin + rdelta * step + nmax) / span
        q = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        sum_l, sum_l2, sum_xl = (w * q).sum(axis=1), (w * q * q).sum(axis=1), (w * q * x).sum(axis=1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, 1.0)
        s = (sum_w * sum_xl - sum_x * sum_l) / safe
        m = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        clamp = m > 0  # the offset must not be positive: refit the scale alone through zero
        m = np.where(clamp, 0.0, m)
        s = np.where(clamp, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0), s)
        err = (w * (s[:, None] * q + m[:, None] - x) ** 2).sum(axis=1)
        better = ok & (err < best)
        best = np.where(better, err, best)
        scale = np.where(better, s, scale)
        offset = np.where(better, m, offset)
    scale = np.where(flat, 0.0, scale)
    offset = np.where(flat, lo, offset)
    return scale.astype(np.float32), (-offset).astype(np.float32)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (last dim a multiple of 256) -> Q4_K bytes, shape [..., row / 256 * 144] uint8."""
    shape = np.shape(x)
    blocks = _rows_to_blocks(x)
    n = blocks.shape[0]
    sub = blocks.reshape(n * 8, 32)
    weights = np.sqrt((sub * sub).mean(axis=1, keepdims=True)) + np.abs(sub)
    scales, mins = _fit_scale_min(sub, weights, nmax=15)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)

    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    inv_scale = np.where(max_scale > 0, 63.0 / np.where(max_scale > 0, max_scale, 1.0), 0.0)
    inv_min = np.where(max_min > 0, 63.0 / np.where(max_min > 0, max_min, 1.0), 0.0)
    ls = np.minimum(np.rint(inv_scale[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_min[:, None] * mins), 63).astype(np.uint8)
    d = (max_scale / 63.0).astype(np.float16)
    dmin = (max_min / 63.0).astype(np.float16)

    # requantize every value against the 6-bit scales actually stored
    eff_d = (d.astype(np.float32)[:, None] * ls).reshape(n * 8, 1)
    eff_m = (dmin.astype(np.float32)[:, None] * lm).reshape(n * 8, 1)
    q = np.clip(np.rint((sub + eff_m) / np.where(eff_d > 0, eff_d, 1.0)), 0, 15)
    q = np.where(eff_d > 0, q, 0).astype(np.uint8).reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)

    packed = np.empty((n, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)

    out = np.concatenate([d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8), packed, qs], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * Q4_K_BYTES)


def _fit_symmetric(x: np.ndarray, nmax: int) -> np.ndarray:
    """Per row of ``x`` [n, k]: a signed scale so that x ~ scale * q, q in -nmax..nmax-1 (weights x^2)."""
    idx = np.abs(x).argmax(axis=1)
    peak = x[np.arange(x.shape[0]), idx]
    zero = np.abs(peak) < _EPS
    peak = np.where(zero, 1.0, peak)
    w = x * x

    def fit(iscale):
        q = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        sumlx, suml2 = (w * x * q).sum(axis=1), (w * q * q).sum(axis=1)
        return sumlx, suml2

    sumlx, suml2 = fit(-nmax / peak)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = fit(-(nmax + 0.1 * step) / peak)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        s = sumlx / np.where(suml2 > 0, suml2, 1.0)
        scale = np.where(better, s, scale)
        best = np.where(better, s * sumlx, best)
    return np.where(zero, 0.0, scale).astype(np.float32)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (last dim a multiple of 256) -> Q6_K bytes, shape [..., row / 256 * 210] uint8."""
    shape = np.shape(x)
    blocks = _rows_to_blocks(x)
    n = blocks.shape[0]
    sub = blocks.reshape(n * 16, 16)
    scales = _fit_symmetric(sub, nmax=32).reshape(n, 16)

    pick = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(n), pick]
    zero = np.abs(max_scale) < _EPS
    iscale = np.where(zero, 0.0, -128.0 / np.where(zero, 1.0, max_scale))
    d = np.where(zero, 0.0, 1.0 / np.where(iscale == 0, 1.0, iscale)).astype(np.float16)
    ls = np.minimum(np.rint(iscale[:, None] * scales), 127).astype(np.int8)

    eff = (d.astype(np.float32)[:, None] * ls).reshape(n * 16, 1)
    q = np.clip(np.rint(sub / np.where(eff != 0, eff, 1.0)), -32, 31)
    q = (np.where(eff != 0, q, 0) + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # [block, half, quarter, lane]
    ql = np.concatenate([q[:, :, 0] & 0xF | ((q[:, :, 2] & 0xF) << 4),
                         q[:, :, 1] & 0xF | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(n, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    qh = qh.reshape(n, 64)

    out = np.concatenate([ql, qh, ls.view(np.uint8), d.reshape(n, 1).view(np.uint8)], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * Q6_K_BYTES)
