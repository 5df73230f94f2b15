"""Rotary position embedding (RoPE), in the Llama / Hugging Face layout: dimension i of a head is
rotated together with dimension i + head_dim / 2."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..ops.norm import rms_norm_cast

KERNELS = ("torch", "liger")   # the values of a layer's ``kernels`` attribute


_CACHE: dict = {}
CACHE_MAX = 2**22   # elements per table (16 MiB in float32)


def rope_cos_sin(start: int | tuple[tuple[int, int], ...], length: int, head_dim: int, theta: float,
                 device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin ``[length, head_dim / 2]`` (float32) for positions ``start .. start + length - 1``,
    or, with ``start`` a tuple of ``(first, count)`` spans whose counts add up to ``length``, for those
    positions in that order (a sequence-parallel rank holding two chunks of the sequence).

    The angles are formed in float64: at position 2M a float32 angle is off by up to 0.06 rad.
    The last result up to ``CACHE_MAX`` elements is cached: every layer of a step asks for the same
    table, in forward and in the recompute, and at short lengths building it costs more launches than
    the rotation itself. The tables are never written to.
    """
    spans = ((start, length),) if isinstance(start, int) else tuple(start)
    if sum(n for _, n in spans) != length:
        raise ValueError(f"RoPE position spans {spans} do not add up to {length} positions")
    if length * head_dim // 2 > CACHE_MAX:
        return _angles(spans, head_dim, theta, device)
    key = (spans, head_dim, float(theta), str(torch.device(device) if device is not None else "cpu"))
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _angles(spans, head_dim, theta, device)
    return _CACHE[key]


def _angles(spans: tuple[tuple[int, int], ...], head_dim: int, theta: float, device) -> tuple[Tensor, Tensor]:
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    pos = torch.cat([torch.arange(s, s + n, dtype=torch.float64, device=device) for s, n in spans])
    angles = torch.outer(pos, inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[B, H, S, head_dim]`` by the angles of ``cos``/``sin`` ``[S, head_dim / 2]``.

    Computed in ``x``'s dtype (as Hugging Face Llama does, each product accumulated in float32), so
    no float32 copy of q and k is made. The result has ``x``'s layout (for a projection's output,
    ``[B, S, H, head_dim]`` in memory, which the attention kernels take natively). The rotation is
    linear, so autograd keeps only ``cos``/``sin``: backward rotates the gradient back, and ``x`` (a
    projection's output) is freed after forward.
    """
    if not torch.is_grad_enabled() or not x.requires_grad:
        return _rotate(x, cos.to(x.dtype), sin.to(x.dtype))
    return _Rope.apply(x, cos, sin)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor | None = None) -> Tensor:
    """``[a, b] -> [a cos - b sin, b cos + a sin]`` along the last dim (``sin`` negated: the inverse)."""
    a, b = x.chunk(2, dim=-1)
    out = torch.empty_like(x) if out is None else out   # keeps x's layout (see apply_rope)
    lo, hi = out.chunk(2, dim=-1)
    torch.mul(a, cos, out=lo).addcmul_(b, sin, value=-1)
    torch.mul(b, cos, out=hi).addcmul_(a, sin)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        ctx.save_for_backward(cos, sin)
        # the gradient is laid out like x (a transposed projection output), so the projection's
        # backward needs no copy
        ctx.layout = x.stride() if x.transpose(1, 2).is_contiguous() else None
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        out = None
        if ctx.layout is not None:
            out = torch.empty_strided(dy.shape, ctx.layout, dtype=dy.dtype, device=dy.device)
        return _rotate(dy, cos, -sin, out), None, None


def _rope_both(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def norm_rope(kernels: str) -> tuple[Callable, Callable]:
    """``(rms_norm_cast, rope(q, k, cos, sin))`` of a layer's ``kernels``: ``'torch'`` (``ops.norm`` and
    ``apply_rope`` above) or ``'liger'`` (Liger-Kernel's, ``revnet_zero.kernels.norm_rope``; CUDA)."""
    if kernels == "torch":
        return rms_norm_cast, _rope_both
    if kernels == "liger":
        from ..kernels import norm_rope as liger
        return liger.liger_rms_norm_cast, liger.liger_rope
    raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
