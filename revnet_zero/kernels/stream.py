"""The affine coupling's stream rebuild and its gradients in one Triton pass.

In the reversible backward of ``AffineCoupling`` (``y = x·s + t``, ``(a, t) = h`` split along the last
dim, ``s = exp(c·tanh(a))``) the engine rebuilds the stream and pulls the gradient through the update:

    x  = (y - t) / s          dx = dy · s          dh = [dy · s · x · c·(1 - tanh(a)²),  dy]

which eagerly is some ten elementwise passes (tanh, exp, sub, div, two scale-and-shift computations,
products, a concatenation). Here one program reads a block of ``y, h, dy`` once and writes ``x`` over
``y``, and ``dx`` and ``dh``. ``tanh`` and ``exp`` are Triton's, not PyTorch's, so results
differ from ``reference_affine_separate_vjp`` by rounding (tests/test_kernels.py states the tolerance).
For an additive coupling the engine already does one pass each (``y -= h``; ``dx`` is ``dy``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import AffineCoupling   # the public name: where the class lives may move

BLOCK = 1024


@triton.jit
def _affine_kernel(y_ptr, h_ptr, dy_ptr, dx_ptr, dh_ptr, n, D, c, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    row, col = offs // D, offs % D
    a = tl.load(h_ptr + row * 2 * D + col, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(h_ptr + row * 2 * D + D + col, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    th = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)   # tanh(a), exact at both ends (exp overflows to inf: th = 1)
    s = tl.exp(c * th)
    x = (y - t) / s
    dx = dy * s
    da = dx * x * (c * (1.0 - th * th))
    tl.store(y_ptr + offs, x.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + row * 2 * D + col, da.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + row * 2 * D + D + col, dy.to(dh_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("revnet_zero::affine_separate_vjp_", mutates_args=("y",))
def _affine_op(y: Tensor, h: Tensor, dy: Tensor, scale_init: float) -> tuple[Tensor, Tensor]:
    dx = torch.empty(y.shape, dtype=torch.promote_types(dy.dtype, torch.float32), device=dy.device)
    dh = torch.empty(h.shape, dtype=dx.dtype, device=dy.device)
    n = y.numel()
    if n:
        _affine_kernel[(triton.cdiv(n, BLOCK),)](y, h.contiguous(), dy.contiguous(), dx, dh, n, y.shape[-1], scale_init,
                                                 BLOCK=BLOCK)
    return dx, dh


@_affine_op.register_fake
def _(y, h, dy, scale_init):
    dtype = torch.promote_types(dy.dtype, torch.float32)
    return torch.empty(y.shape, dtype=dtype, device=dy.device), torch.empty(h.shape, dtype=dtype, device=dy.device)


def affine_separate_vjp(y: Tensor, h: Tensor, dy: Tensor, scale_init: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, dx, dh)`` of the affine coupling for its output ``y [..., D]``, its sub-function's output
    ``h [..., 2D]`` (shift-and-scale logits ``a`` then shift ``t`` along the last dim) and the output's
    gradient ``dy [..., D]``; ``x`` is written into ``y`` (contiguous, given up), ``dx`` and ``dh`` are
    new, in float32 (as the eager products with the float32 scale give them).

    Example::

        x, dx, dh = affine_separate_vjp(y, h, dy, scale_init=0.1)
    """
    if y.shape != dy.shape or h.shape[:-1] != y.shape[:-1] or h.shape[-1] != 2 * y.shape[-1]:
        raise ValueError(f"affine_separate_vjp needs y, dy [..., D] and h [..., 2D]; got y {tuple(y.shape)}, "
                         f"h {tuple(h.shape)}, dy {tuple(dy.shape)}")
    if not y.is_contiguous():
        raise ValueError(f"affine_separate_vjp writes x into y: y must be contiguous, got strides {y.stride()}")
    dx, dh = _affine_op(y, h, dy, float(scale_init))
    return y, dx, dh


def reference_affine_separate_vjp(y: Tensor, h: Tensor, dy: Tensor, scale_init: float) -> tuple[Tensor, Tensor, Tensor]:
    """The eager path: ``AffineCoupling.separate`` then ``combine_vjp`` (last-dim split), out of place."""
    a, t = h.chunk(2, dim=-1)
    th = torch.tanh(a.to(torch.promote_types(a.dtype, torch.float32)))
    s = torch.exp(scale_init * th)
    x = (y - t) / s
    dx = dy * s
    da = dx * x * (scale_init * (1 - th * th))
    return x, dx, torch.cat([da, dy], dim=-1)


class TritonAffineCoupling(AffineCoupling):
    """``AffineCoupling`` whose backward rebuilds each stream and pulls its gradient through in one
    Triton pass (``affine_separate_vjp``) where the kernel runs (``runs_on``; the scale and shift split
    along the last dim; a contiguous stream tile), else as ``AffineCoupling`` does. Forward and
    inverse are ``AffineCoupling``'s; the backward's results differ from it by float rounding only.

    Example::

        c = TritonAffineCoupling(f=nn.Linear(64, 128), g=nn.Linear(64, 128))
        y1, y2 = ReversibleBlock(c)(x1, x2)
    """

    def separate_vjp(self, y: Tensor, h: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        from . import runs_on
        if (runs_on(y) and self.split_dim in (-1, y.dim() - 1) and y.is_contiguous()
                and h.shape[:-1] == y.shape[:-1] and h.shape[-1] == 2 * y.shape[-1]):
            return affine_separate_vjp(y, h, dy, self.scale_init)
        return super().separate_vjp(y, h, dy)
