"""The fixed-point grid that makes BDIA's inverse exact.

A converted layer's activations live on the grid ``x = X · 2^-GRID_BITS`` with ``X`` an int64
tensor. On integers, adding and subtracting are exact, and multiplying by ``γ = ±2^-m`` is a shift
whose lost low bits (``m`` per element) are stored, so every step of the stack inverts bit for bit.

``GRID_BITS = 24``: the grid step 2^-24 ≈ 6e-8 is finer than fp32's own spacing for every |x| ≥ 0.5,
so rounding to it perturbs a typical activation less than fp32 arithmetic already does, and
int64 leaves room for |x| < 2^38 (``LIMIT``). Scaling by 2^24 is exact in floating point, so
``to_grid`` rounds once, and ``from_grid`` (int64 → float, correctly rounded) is a deterministic
function of ``X``: the forward and the backward's rebuild feed the layer the same bits.
"""
from __future__ import annotations

import torch
from torch import Tensor

GRID_BITS = 24
LIMIT = 2.0 ** 38  # |x| beyond this would overflow int64 after scaling by 2^GRID_BITS


def to_grid(x: Tensor) -> Tensor:
    """``round(x · 2^GRID_BITS)`` as int64, for ``|x| < LIMIT`` (see ``check_range``)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # exact; fp16 would overflow when scaled
    return torch.round(x * 2.0 ** GRID_BITS).to(torch.int64)


def check_range(peak: Tensor) -> None:
    """Refuse a largest ``|x|`` that the grid cannot hold, NaN and inf included (a NaN cast to an integer
    would otherwise turn silently into a large finite number). One host sync."""
    if not peak < LIMIT:
        raise FloatingPointError(f"reversible conversion: an activation reached |x| = {peak.item()}, which the "
                                 f"fixed-point grid cannot hold (limit 2^38 = {LIMIT:.3g}; NaN/inf included)")


def from_grid(X: Tensor, dtype: torch.dtype) -> Tensor:
    """The float value of grid integers ``X`` in ``dtype`` (one correct rounding)."""
    return X.to(dtype) * 2.0 ** -GRID_BITS


def gamma_bits(gamma0: float) -> int:
    """``m`` for ``γ0 = 2^-m``: 1/2 → 1, 1/4 → 2, 1/8 → 3."""
    for m in (1, 2, 3):
        if gamma0 == 2.0 ** -m:
            return m
    raise ValueError(f"gamma0 must be 1/2, 1/4 or 1/8 (an exact power of two, so the lost bits can be "
                     f"stored), got {gamma0!r}")


def pack_bits(r: Tensor, m: int) -> Tensor:
    """Pack ``r`` (integers in ``[0, 2^m)``) into uint8, exactly ``m`` bits each: eight values make one
    ``8m``-bit word, written as ``m`` bytes."""
    flat = r.reshape(-1).to(torch.int32)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).view(-1, 8)
    word = torch.zeros_like(flat[:, 0])
    for j in range(8):
        word |= flat[:, j] << (m * j)
    return torch.stack([(word >> (8 * i)) & 255 for i in range(m)], dim=1).to(torch.uint8).view(-1)


def unpack_bits(packed: Tensor, m: int, shape: torch.Size) -> Tensor:
    """Inverse of ``pack_bits``, as int64 of ``shape``."""
    bytes_ = packed.view(-1, m).to(torch.int32)
    word = torch.zeros_like(bytes_[:, 0])
    for i in range(m):
        word |= bytes_[:, i] << (8 * i)
    r = torch.stack([(word >> (m * j)) & ((1 << m) - 1) for j in range(8)], dim=1)
    return r.view(-1)[:shape.numel()].view(shape).to(torch.int64)


def gamma_step(X_prev: Tensor, signs: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """``Q[γ · x_prev]`` on the grid for ``γ = signs · 2^-m`` (signs ``[B]`` of ±1): ``signs · (X_prev >> m)``,
    and the ``m`` low bits it drops."""
    s = signs.view(-1, *[1] * (X_prev.dim() - 1))
    return (X_prev >> m) * s, X_prev & ((1 << m) - 1)


def gamma_unstep(A: Tensor, low: Tensor, signs: Tensor, m: int) -> Tensor:
    """``X_prev`` from ``A = signs · (X_prev >> m)`` and its dropped bits ``low``: exact."""
    s = signs.view(-1, *[1] * (A.dim() - 1))
    return ((A * s) << m) | low
