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

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

GRID_BITS = 24
LIMIT = 2.0 ** 38  # |x| beyond this would overflow int64 after scaling by 2^GRID_BITS


def to_grid(x: Tensor) -> Tensor:
    """``round(x · 2^GRID_BITS)`` (half to even) as int64, for ``|x| < LIMIT`` (see ``check_range``).
    bf16 and float32 scale in their own dtype, which is exact (a power of two; bf16 has float32's
    exponent range) and so is rounding there (a bf16 value of 256 or more is already an integer): one
    temporary of ``x``'s dtype. fp16 would overflow when scaled and float64 is exact as it is: both go
    through float32 / float64 as before."""
    if x.dtype in (torch.bfloat16, torch.float32, torch.float64):
        y = x * 2.0 ** GRID_BITS
    else:
        y = x.to(torch.promote_types(x.dtype, torch.float32)).mul_(2.0 ** GRID_BITS)
    return y.round_().to(torch.int64)


def check_range(peak: Tensor) -> None:
    """Refuse a largest ``|x|`` that the grid cannot hold, NaN and inf included (a NaN cast to an integer
    would otherwise turn silently into a large finite number). One host sync."""
    if not peak < LIMIT:
        raise FloatingPointError(f"reversible conversion: an activation reached |x| = {peak.item()}, which the "
                                 f"fixed-point grid cannot hold (limit 2^38 = {LIMIT:.3g}; NaN/inf included)")


def from_grid(X: Tensor, dtype: torch.dtype) -> Tensor:
    """The float value of grid integers ``X`` in ``dtype``: ``X`` rounded to ``dtype`` as ``X.to(dtype)``
    rounds it, times 2^-GRID_BITS (exact). For float32 (the default dtype, which an int64 tensor times a
    Python float gives), one pass: the multiply reads int64 and converts it on the fly (the same
    conversion). Always eager, also after the compiled step: on CUDA, inductor's kernels round int64 to
    bfloat16 differently from PyTorch's own in about 1 element in 2^17 (measured on an H200, torch 2.11,
    even written as ``.to(float32).to(bfloat16)``), and the backward's rebuild feeds the layer
    ``from_grid`` of the rebuilt integers, which must be the forward's bits."""
    if dtype == torch.float32 == torch.get_default_dtype():
        return X * 2.0 ** -GRID_BITS
    return X.to(dtype).mul_(2.0 ** -GRID_BITS)


def gamma_bits(gamma0: float) -> int:
    """``m`` for ``γ0 = 2^-m``: 1/2 → 1, 1/4 → 2, 1/8 → 3."""
    for m in (1, 2, 3):
        if gamma0 == 2.0 ** -m:
            return m
    raise ValueError(f"gamma0 must be 1/2, 1/4 or 1/8 (an exact power of two, so the lost bits can be "
                     f"stored), got {gamma0!r}")


def pack_bits(r: Tensor, m: int) -> Tensor:
    """Pack ``r`` (integers in ``[0, 2^m)``) into uint8, exactly ``m`` bits each: eight values make one
    ``8m``-bit word, written as ``m`` bytes. Temporaries are an eighth of ``r`` in int32."""
    flat = r.reshape(-1).to(torch.uint8)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    flat = flat.view(-1, 8)
    word = flat[:, 0].to(torch.int32)
    for j in range(1, 8):
        word |= flat[:, j].to(torch.int32) << (m * j)
    out = torch.empty(word.numel(), m, dtype=torch.uint8, device=r.device)
    for i in range(m):
        out[:, i] = (word >> (8 * i)) & 255
    return out.view(-1)


def unpack_bits(packed: Tensor, m: int, shape: torch.Size) -> Tensor:
    """Inverse of ``pack_bits``: uint8 of ``shape``."""
    bytes_ = packed.view(-1, m)
    word = bytes_[:, 0].to(torch.int32)
    for i in range(1, m):
        word |= bytes_[:, i].to(torch.int32) << (8 * i)
    if torch.compiler.is_compiling():
        # one broadcast shift for the eight fields: the eight strided writes below compile to a loop that
        # ran 40x slower on CPU (inductor, torch 2.13), while eagerly they are the faster form there
        shifts = torch.arange(0, 8 * m, m, dtype=torch.int32, device=packed.device)
        r = (word.unsqueeze(1) >> shifts).to(torch.uint8).bitwise_and_((1 << m) - 1)
    else:
        r = torch.empty(word.numel(), 8, dtype=torch.uint8, device=packed.device)
        for j in range(8):
            r[:, j] = (word >> (m * j)) & ((1 << m) - 1)
    return r.view(-1)[:shape.numel()].view(shape)


class Signs(NamedTuple):
    """The signs of ``γ`` for one layer: ``dev``, ``[B]`` of ±1 on the layer's device (the grid step's
    operand), and ``common``, the sign every sample has if they agree (always at batch 1), else None."""
    dev: Tensor
    common: int | None


def gammas(signs: Signs, m: int, like: Tensor) -> Tensor | float:
    """``γ = signs · 2^-m``: a Python float when every sample has the same sign, else a tensor in
    ``like``'s dtype shaped ``[B, 1, ..., 1]`` to broadcast against it."""
    if signs.common is not None:
        return signs.common * 2.0 ** -m
    return (signs.dev.to(like.dtype) * 2.0 ** -m).view(-1, *[1] * (like.dim() - 1))


def _apply_signs(A: Tensor, signs: Tensor, common: int | None) -> Tensor:
    """``A *= signs`` (per sample), in place; with a ``common`` sign one pass or none."""
    if common == 1:
        return A
    if common == -1:
        return A.neg_()
    return A.mul_(signs.view(-1, *[1] * (A.dim() - 1)))


def gamma_step(X_prev: Tensor, signs: Tensor, m: int, inplace: bool = False,
               common: int | None = None) -> tuple[Tensor, Tensor]:
    """``Q[γ · x_prev]`` on the grid for ``γ = signs · 2^-m`` (signs ``[B]`` of ±1): ``signs · (X_prev >> m)``,
    and the ``m`` low bits it drops (uint8). ``inplace`` computes the first in ``X_prev``'s memory;
    ``common``: the sign of every sample, if they agree (see ``Signs``)."""
    low = X_prev.to(torch.uint8).bitwise_and_((1 << m) - 1)  # int64 -> uint8 keeps the low 8 bits
    A = X_prev.bitwise_right_shift_(m) if inplace else X_prev >> m
    return _apply_signs(A, signs, common), low


def gamma_unstep(A: Tensor, low: Tensor, signs: Tensor, m: int, inplace: bool = False,
                 common: int | None = None) -> Tensor:
    """``X_prev`` from ``A = signs · (X_prev >> m)`` and its dropped bits ``low``: exact. ``inplace``
    computes it in ``A``'s memory."""
    X = A if inplace else A.clone()
    return _apply_signs(X, signs, common).bitwise_left_shift_(m).bitwise_or_(low)


# ---- the BDIA update and one step on the grid, fused on CUDA
#
# Eagerly a step is the update ``b = (1+γ)·y - 2γ·x`` and some twenty elementwise passes over int64
# tensors (to_grid, shift, sign, add, pack; and back), which at 8k tokens cost about as much as the
# layer's own kernels. On CUDA ``update_forward`` / ``update_backward`` compile (torch.compile) the
# update and the step into a few kernels, by default (``from_grid`` stays eager: see there). They hold only
# products by powers of two, integer arithmetic, exact float scaling and round-half-even, and compile
# with eager's rounding of bf16 intermediates (inductor's ``emulate_precision_casts``; a torch without
# it runs bf16 eagerly), so compiled and eager results are the same bits (tests/test_conversion.py
# checks it on CUDA and on the CPU back end). Compiling costs some seconds at the first step and again
# at the first step of a new shape; a failed compile warns and runs eagerly. Not with offload, whose
# eager steps work in place (memory is what offload is for). ``revnet_zero.conversion.grid.FUSE = False`` turns it off.

FUSE = True
FUSE_DEVICES = ("cuda",)   # where FUSE applies; tests add "cpu" (inductor's C++ back end) to run it there
FUSE_DTYPES = (torch.float32, torch.bfloat16)
_FUSED: dict = {}


def abs_max(b: Tensor) -> Tensor:
    """``max |b|`` as a float32 scalar, NaN if any element is NaN, without a temporary the size of ``b``."""
    lo, hi = torch.aminmax(b)
    return torch.maximum(hi.float(), -lo.float())


def residual_update(y: Tensor, x: Tensor, gamma: Tensor | float | None) -> Tensor:
    """BDIA's ``(1-γ)·x + (1+γ)·h`` with ``h = y - x``, written as ``(1+γ)·y - 2γ·x`` (no cancellation).
    ``γ = None``: the first layer of a run, ``y`` itself. Shared by forward, backward and reference,
    so all three round identically. For a float ``γ = ±2^-m`` it runs as ``(y + γ·y) - 2γ·x`` in two
    ``add``s with ``alpha``: ``1 + γ`` is exact and so is every product by a power of two, so each
    result is the same correctly rounded value as the tensor form's (tested), in two passes, not three.
    Not for float16, whose subnormals begin at 6e-5: there ``γ·y`` can round, so it keeps the tensor
    form's arithmetic (with the float, still one kernel per op without a broadcast operand)."""
    if gamma is None:
        return y
    if isinstance(gamma, float) and y.dtype != torch.float16:
        return torch.add(torch.add(y, y, alpha=gamma), x, alpha=-2 * gamma)
    return (1 + gamma) * y - (2 * gamma) * x


def _exact_update(y: Tensor, x: Tensor, gamma: Tensor | float) -> Tensor:
    """``residual_update`` inside a compiled graph: ``(y + γ·y) - 2γ·x`` has only exact products, so a
    compiler contracting it into fused multiply-adds cannot change a bit (float32 and bfloat16)."""
    return (y + gamma * y) - (2 * gamma) * x


def _update_forward(y: Tensor, x: Tensor, X_prev: Tensor, signs: Tensor, gamma,
                    m: int) -> tuple[Tensor, Tensor, Tensor]:
    b = _exact_update(y, x, gamma)
    A, low = gamma_step(X_prev, signs, m)
    X_next = to_grid(b) + A
    return X_next, pack_bits(low, m), abs_max(b)


def _update_backward(y: Tensor, x: Tensor, X_next: Tensor, packed: Tensor, signs: Tensor, gamma, m: int) -> Tensor:
    low = unpack_bits(packed, m, X_next.shape)
    return gamma_unstep(X_next - to_grid(_exact_update(y, x, gamma)), low, signs, m, inplace=True)


# One function per (step, m), each its own code object with ``m`` a literal: Dynamo then never sees
# ``m`` change, so it stays a constant of the graph. (One lambda closing over ``m`` compiled for a second
# ``m`` made it a symbolic int, and ``1 << m`` on a symbolic int failed to trace in torch 2.11.)
_STEPS = {
    (_update_forward, 1): lambda y, x, X, s, g: _update_forward(y, x, X, s, g, 1),
    (_update_forward, 2): lambda y, x, X, s, g: _update_forward(y, x, X, s, g, 2),
    (_update_forward, 3): lambda y, x, X, s, g: _update_forward(y, x, X, s, g, 3),
    (_update_backward, 1): lambda y, x, X, p, s, g: _update_backward(y, x, X, p, s, g, 1),
    (_update_backward, 2): lambda y, x, X, p, s, g: _update_backward(y, x, X, p, s, g, 2),
    (_update_backward, 3): lambda y, x, X, p, s, g: _update_backward(y, x, X, p, s, g, 3),
}


def _fused(fn, m: int):
    """``fn`` compiled for one ``m`` (automatic dynamic shapes: static first, dynamic once a shape changes),
    rounding bf16 intermediates as eager does where inductor has that switch."""
    if (fn, m) not in _FUSED:
        options = {"emulate_precision_casts": True} if _emulates_precision_casts() else {}
        _FUSED[fn, m] = torch.compile(_STEPS[fn, m], fullgraph=True, options=options)
    return _FUSED[fn, m]


# Dynamo counts recompiles per code object against a limit (8 by default), and with fullgraph=True
# the one past it fails instead of running eagerly. Each function above recompiles per dtype and
# layout (static, then dynamic shapes); this leaves room.
RECOMPILE_LIMIT = 32


def _run_fused(fn, m: int, *args):
    """The compiled step; if compiling fails, warn once and run eagerly from then on (same bits)."""
    global FUSE
    try:
        with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)):
            return _fused(fn, m)(*args)
    except Exception as e:  # noqa: BLE001 - any compiler failure: the eager step is exact too
        FUSE = False
        warnings.warn(f"revnet_zero: compiling the BDIA grid step failed ({type(e).__name__}: {str(e)[:200]}); "
                      "running it eagerly (same results, slower)", RuntimeWarning, stacklevel=3)
        return None


def _fuse(t: Tensor) -> bool:
    """Whether the compiled step runs for ``t``: bf16 only where inductor can round its intermediates as
    eager does (else the compiled and the eager step could differ, and a fallback between a step's
    forward and its backward would break the inverse)."""
    if not (FUSE and t.device.type in FUSE_DEVICES and t.dtype in FUSE_DTYPES):
        return False
    return t.dtype != torch.bfloat16 or _emulates_precision_casts()


def _emulates_precision_casts() -> bool:
    import torch._inductor.config as inductor
    return hasattr(inductor, "emulate_precision_casts")


def update_forward(y: Tensor, x: Tensor, X_prev: Tensor | Callable[[], Tensor], signs: Signs, m: int,
                   fuse: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One BDIA layer's step forward from the layer's output ``y`` and input ``x``: ``X_next`` (the grid
    value of ``Q[γ·x_prev] + Q[residual_update(y, x, γ)]``), the packed bits it drops, the update's
    ``max |b|`` and ``from_grid(X_next)``. Compiled where ``FUSE`` applies and ``fuse``, else eagerly
    (``from_grid`` eagerly in both)."""
    fetch, gamma = (X_prev if callable(X_prev) else (lambda: X_prev)), gammas(signs, m, x)
    if fuse and _fuse(y):
        X = fetch()
        out = _run_fused(_update_forward, m, y, x, X, signs.dev, gamma)
        if out is not None:
            return *out, from_grid(out[0], x.dtype)   # eagerly (see from_grid)
        fetch = lambda: X  # noqa: E731 - fetched once
    b = residual_update(y, x, gamma)
    del y   # the caller passes it unnamed: b replaces it
    X_next, packed, peak = step_forward(b, fetch, signs, m)
    del b
    return X_next, packed, peak, from_grid(X_next, x.dtype)


def update_backward(y: Tensor, x: Tensor, X_next: Tensor, packed: Tensor, signs: Signs, m: int,
                    overwrite: bool = False) -> Tensor:
    """``X_prev`` from ``X_next``, the recomputed layer output ``y`` and input ``x``, and the stored bits:
    exact. Compiled where ``FUSE`` applies, unless ``overwrite`` (``X_prev`` in ``X_next``'s memory, eagerly)."""
    gamma = gammas(signs, m, x)
    if not overwrite and _fuse(y):
        out = _run_fused(_update_backward, m, y, x, X_next, packed, signs.dev, gamma)
        if out is not None:
            return out
    b = residual_update(y, x, gamma)
    del y   # with offload the caller's is a fresh copy from host memory: b replaces it
    return step_backward(b, X_next, packed, signs, m, overwrite)


def step_forward(b: Tensor, X_prev: Tensor | Callable[[], Tensor], signs: Signs,
                 m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Eagerly, ``X_next = to_grid(b) + Q[γ·x_prev]``, the packed bits that drops, and ``max |b|``.
    ``X_prev`` (which the caller gives up) is shifted in place to save an int64 temporary. ``X_prev``
    may be a function giving it: it is called once ``b`` is on the grid, so a tensor it fetches
    (from host memory) and ``to_grid``'s temporaries are not alive together."""
    fetch = X_prev if callable(X_prev) else (lambda: X_prev)
    X_next = to_grid(b)
    A, low = gamma_step(fetch(), signs.dev, m, inplace=True, common=signs.common)
    X_next += A
    return X_next, pack_bits(low, m), abs_max(b)


def step_backward(b: Tensor, X_next: Tensor, packed: Tensor, signs: Signs, m: int,
                  overwrite: bool = False) -> Tensor:
    """Eagerly, ``X_prev`` from ``X_next``, the layer's recomputed ``b`` and the stored bits: exact.
    ``overwrite``: ``X_prev`` may be computed in ``X_next``'s memory (one int64 temporary less)."""
    low = unpack_bits(packed, m, X_next.shape)
    X = X_next.sub_(to_grid(b)) if overwrite else X_next - to_grid(b)
    return gamma_unstep(X, low, signs.dev, m, inplace=True, common=signs.common)
