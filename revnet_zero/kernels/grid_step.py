"""BDIA's update and fixed-point grid step as one Triton pass each way.

Forward, for a layer output ``y``, input ``x``, the grid integers ``X`` of ``x_prev`` and the signs
``s`` (``[B]`` of ±1, ``γ = s·2^-m``), per element in one read of ``y, x, X``:

    b      = (1+γ)·y - 2γ·x                (each op rounded to y's dtype, as eager PyTorch rounds it)
    X_next = round_half_even(b · 2^24) + s·(X >> m)
    low    = X & (2^m - 1)                 (packed, m bits an element, eight elements to m bytes)

and the largest ``|b|`` (NaN if any is NaN) as per-block partial maxima and NaN flags. ``X_next`` overwrites ``X``.
Backward reads ``y, x, X_next`` and the packed bits and writes ``X_prev = (s·(X_next - round(b·2^24))
<< m) | low``. Both equal ``revnet_zero.conversion.grid``'s eager path bit for bit (its functions are
the references here), for finite ``b``. A NaN or inf ``b`` gives a NaN or inf ``max |b|`` and the run
fails its range check either way (the grid integers of a non-finite value are meaningless in both).

Two roundings are written out rather than left to Triton: round-half-even to an integer (``floor``
and a tie rule: ``libdevice.rint`` has no interpreter form) and float32 -> bfloat16 (the interpreter's
cast truncates, the GPU's rounds to nearest even; the bit trick below rounds to nearest even on both).
Offsets are int64: a 1M-token, 4096-wide tensor has 4.3e9 elements.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..conversion import grid

GROUPS = 128   # groups of eight elements per program: 1024 elements
# The update must round as eager PyTorch does: ``(1+γ)·y`` rounded, then ``- 2γ·x`` rounded. The compiler
# contracts the two into one fused multiply-add (one rounding): on an H200, float32 then differed from
# eager (bf16 rounds explicitly in between, which no contraction crosses). The CPU interpreter has no such
# option (and contracts nothing).
NO_FMA = {} if os.environ.get("TRITON_INTERPRET") == "1" else {"enable_fp_fusion": False}


@triton.jit
def _round_half_even(v):
    """``v`` (float32, integral part within int64) rounded half to even, as int64."""
    f = tl.floor(v)
    d = v - f   # exact: v and floor(v) are within 1 of each other
    i = f.to(tl.int64)
    up = (d > 0.5) | ((d == 0.5) & ((i & 1) == 1))
    return i + up.to(tl.int64)


@triton.jit
def _round_bf16(v):
    """float32 ``v`` rounded to nearest-even bfloat16, still held in float32 (NaN kept)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


@triton.jit
def _update(y_ptr, x_ptr, offs, mask, s, M: tl.constexpr, BF16: tl.constexpr):
    """``b = (1+γ)·y - 2γ·x`` with eager's rounding, in float32 (bf16 values when BF16): ``(1+γ)·y`` is
    ``y + γ·y`` exactly, rounded once, whichever form eager used (``grid.residual_update``)."""
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = s.to(tl.float32) * (1.0 / (1 << M))
    t = y * (1.0 + g)
    if BF16:
        t = _round_bf16(t)
    b = t - (2.0 * g) * x
    if BF16:
        b = _round_bf16(b)
    return b


@triton.jit
def _tile(pid, n, per_sample, signs_ptr, GROUPS: tl.constexpr):
    """Offsets ``[GROUPS, 8]`` (int64) of this program's elements, their mask and their samples' signs."""
    groups = pid.to(tl.int64) * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    offs = groups[:, None] * 8 + tl.arange(0, 8).to(tl.int64)[None, :]
    mask = offs < n
    s = tl.load(signs_ptr + offs // per_sample, mask=mask, other=1).to(tl.int64)
    return groups, offs, mask, s


@triton.jit
def _step_kernel(y_ptr, x_ptr, X_ptr, signs_ptr, packed_ptr, peak_ptr, nan_ptr, n, per_sample,
                 M: tl.constexpr, BF16: tl.constexpr, GROUPS: tl.constexpr):
    pid = tl.program_id(0)
    groups, offs, mask, s = _tile(pid, n, per_sample, signs_ptr, GROUPS)
    b = _update(y_ptr, x_ptr, offs, mask, s, M, BF16)
    X = tl.load(X_ptr + offs, mask=mask, other=0)
    low = (X & ((1 << M) - 1)).to(tl.int32)
    X_next = _round_half_even(b * 16777216.0) + s * (X >> M)
    tl.store(X_ptr + offs, X_next, mask=mask)
    word = tl.sum(low << (tl.arange(0, 8) * M)[None, :], axis=1)   # disjoint bits: the sum is an or
    gmask = groups * 8 < n
    for i in tl.static_range(M):
        tl.store(packed_ptr + groups * M + i, ((word >> (8 * i)) & 255).to(tl.uint8), mask=gmask)
    a = tl.where(mask, tl.abs(b), 0.0)
    # NaN apart (a max's NaN handling differs between back ends): the host side puts it back
    tl.store(nan_ptr + pid, tl.max(tl.where(a != a, 1, 0)).to(tl.int8))
    tl.store(peak_ptr + pid, tl.max(tl.where(a != a, 0.0, a)))


@triton.jit
def _unstep_kernel(y_ptr, x_ptr, X_ptr, signs_ptr, packed_ptr, out_ptr, n, per_sample,
                   M: tl.constexpr, BF16: tl.constexpr, GROUPS: tl.constexpr):
    pid = tl.program_id(0)
    groups, offs, mask, s = _tile(pid, n, per_sample, signs_ptr, GROUPS)
    b = _update(y_ptr, x_ptr, offs, mask, s, M, BF16)
    X_next = tl.load(X_ptr + offs, mask=mask, other=0)
    gmask = groups * 8 < n
    word = tl.zeros([GROUPS], dtype=tl.int32)
    for i in tl.static_range(M):
        byte = tl.load(packed_ptr + groups * M + i, mask=gmask, other=0).to(tl.int32)
        word = word | (byte << (8 * i))
    low = ((word[:, None] >> (tl.arange(0, 8) * M)[None, :]) & ((1 << M) - 1)).to(tl.int64)
    A = X_next - _round_half_even(b * 16777216.0)
    tl.store(out_ptr + offs, ((A * s) << M) | low, mask=mask)


def _check(y: Tensor, x: Tensor, X: Tensor, signs: Tensor, m: int) -> None:
    if y.shape != x.shape or y.shape != X.shape:
        raise ValueError(f"bdia grid step: y {tuple(y.shape)}, x {tuple(x.shape)} and X {tuple(X.shape)} must "
                         "have one shape")
    if y.dtype not in grid.STEP_DTYPES or x.dtype != y.dtype:
        raise TypeError(f"bdia grid step: y and x must both be float32 or bfloat16, got {y.dtype} and {x.dtype}")
    if X.dtype != torch.int64 or not X.is_contiguous():
        raise TypeError(f"bdia grid step: X must be a contiguous int64 tensor, got {X.dtype} "
                        f"(contiguous: {X.is_contiguous()})")
    if signs.dim() != 1 or y.dim() == 0 or signs.numel() != y.shape[0]:
        raise ValueError(f"bdia grid step: signs must be [B] for y {tuple(y.shape)}, got {tuple(signs.shape)}")
    if m not in (1, 2, 3):
        raise ValueError(f"bdia grid step: m must be 1, 2 or 3, got {m!r}")


def _programs(n: int) -> int:
    return triton.cdiv(triton.cdiv(n, 8), GROUPS)


@torch.library.custom_op("revnet_zero::bdia_grid_step_", mutates_args=("X",))
def _step_op(y: Tensor, x: Tensor, X: Tensor, signs: Tensor, m: int) -> tuple[Tensor, Tensor]:
    n = X.numel()
    packed = torch.empty(triton.cdiv(n, 8) * m, dtype=torch.uint8, device=X.device)
    partial = torch.full((max(_programs(n), 1),), float("-inf"), dtype=torch.float32, device=X.device)
    nan = torch.zeros(partial.shape, dtype=torch.int8, device=X.device)
    if n:
        _step_kernel[(_programs(n),)](y.contiguous(), x.contiguous(), X, signs.contiguous(), packed, partial, nan,
                                      n, n // signs.numel(), M=m, BF16=y.dtype == torch.bfloat16, GROUPS=GROUPS,
                                      **NO_FMA)
    return packed, torch.where(nan.any(), float("nan"), partial.max())   # no host sync


@_step_op.register_fake
def _(y, x, X, signs, m):
    return X.new_empty((X.numel() + 7) // 8 * m, dtype=torch.uint8), X.new_empty((), dtype=torch.float32)


@torch.library.custom_op("revnet_zero::bdia_grid_unstep", mutates_args=())
def _unstep_op(y: Tensor, x: Tensor, X_next: Tensor, packed: Tensor, signs: Tensor, m: int) -> Tensor:
    n = X_next.numel()
    out = torch.empty_like(X_next, memory_format=torch.contiguous_format)
    if n:
        _unstep_kernel[(_programs(n),)](y.contiguous(), x.contiguous(), X_next.contiguous(), signs.contiguous(),
                                        packed, out, n, n // signs.numel(), M=m,
                                        BF16=y.dtype == torch.bfloat16, GROUPS=GROUPS, **NO_FMA)
    return out


@_unstep_op.register_fake
def _(y, x, X_next, packed, signs, m):
    return torch.empty_like(X_next, memory_format=torch.contiguous_format)


def bdia_grid_step(y: Tensor, x: Tensor, X: Tensor, signs: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """One BDIA step forward: ``(X_next, packed bits, max |b|)``, ``X_next`` written into ``X``'s memory.

    ``y``, ``x``: the layer's output and input ``[B, ...]`` (float32 or bfloat16); ``X``: the grid
    integers of the previous input (int64, contiguous, given up); ``signs``: ``[B]`` of ±1; ``m``: ``γ0 = 2^-m``.
    Bitwise ``reference_grid_step``.

    Example::

        X_next, packed, peak = bdia_grid_step(y, x, X_prev, signs, m=1)
    """
    _check(y, x, X, signs, m)
    packed, peak = _step_op(y, x, X, signs, m)
    return X, packed, peak


def bdia_grid_unstep(y: Tensor, x: Tensor, X_next: Tensor, packed: Tensor, signs: Tensor, m: int) -> Tensor:
    """``X_prev`` from ``X_next``, the recomputed ``y``, the input ``x`` and the packed bits (a new tensor).
    Bitwise ``reference_grid_unstep``."""
    _check(y, x, X_next, signs, m)
    if packed.dtype != torch.uint8 or packed.numel() != (X_next.numel() + 7) // 8 * m:
        raise ValueError(f"bdia grid unstep: packed must be uint8 of {(X_next.numel() + 7) // 8 * m} bytes for "
                         f"{X_next.numel()} elements and m={m}, got {packed.dtype} of {packed.numel()}")
    return _unstep_op(y, x, X_next, packed, signs, m)


def reference_grid_step(y: Tensor, x: Tensor, X: Tensor, signs: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """The eager PyTorch path the kernel equals (``grid.update_forward`` without its float output)."""
    common = int(signs[0]) if bool((signs == signs[0]).all()) else None
    X_next, packed, peak, _ = grid.update_forward(y, x, X.clone(), grid.Signs(signs, common), m)
    return X_next, packed, peak


def reference_grid_unstep(y: Tensor, x: Tensor, X_next: Tensor, packed: Tensor, signs: Tensor, m: int) -> Tensor:
    """The eager PyTorch path the kernel equals (``grid.update_backward``)."""
    common = int(signs[0]) if bool((signs == signs[0]).all()) else None
    return grid.update_backward(y, x, X_next, packed, grid.Signs(signs, common), m)
