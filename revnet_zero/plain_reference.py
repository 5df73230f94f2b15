"""Plain-PyTorch reference of reversible stacks: ordinary residual code under ordinary autograd.

No custom autograd, no recompute, every activation kept. The tests pin the engine to this.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .couplings import AdditiveCoupling, AffineCoupling, BaseCoupling
from .engine import ReversibleBlock, ReversibleSequence


def reference_block(coupling: BaseCoupling, x1: Tensor, x2: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
    """One coupling, written out as residual code."""
    if isinstance(coupling, AdditiveCoupling):
        f, g = coupling.f, coupling.g
        y1 = x1 + f(x2, **kwargs) if f is not None else x1
        y2 = x2 + g(y1, **kwargs) if g is not None else x2
        return y1, y2
    if isinstance(coupling, AffineCoupling):
        def affine(x, h):
            a, t = h.chunk(2, dim=coupling.split_dim)
            a = a.to(torch.promote_types(a.dtype, torch.float32))
            return x * torch.exp(coupling.scale_init * torch.tanh(a)) + t
        f, g = coupling.f, coupling.g
        y1 = affine(x1, f(x2, **kwargs)) if f is not None else x1
        y2 = affine(x2, g(y1, **kwargs)) if g is not None else x2
        return y1, y2
    return coupling(x1, x2, **kwargs)  # a user coupling's forward is its own plain definition


def reference_forward(stack: ReversibleSequence | ReversibleBlock, x1: Tensor, x2: Tensor | None = None,
                      **kwargs) -> tuple[Tensor, Tensor]:
    """The stack's forward as plain residual code, with the same stream dtype handling."""
    if x2 is None:
        x2 = x1
    if isinstance(stack, ReversibleBlock):
        return reference_block(stack.coupling, x1, x2, **kwargs)
    if stack.stream_dtype is not None:
        x1, x2 = x1.to(stack.stream_dtype), x2.to(stack.stream_dtype)
    for block in stack.blocks:
        x1, x2 = reference_block(block.coupling, x1, x2, **kwargs)
    return x1, x2
