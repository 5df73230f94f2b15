"""Plain-autograd reference of the BDIA training forward: every activation kept, no custom backward.

It computes the same function as ``bdia.py`` — the same signs (drawn from the same generator in the
same order), the same fp32 ops on the layer side, the same grid — with the streams held in
float64 (exact for grid values) and every rounding written ``x + (Q(x) - x).detach()``, so plain
autograd differentiates the formula at the grid values, as the reversible backward does.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .bdia import BDIALayer, draw_signs, gammas
from .grid import GRID_BITS, residual_update
from .wrapping import layer_arguments

_SCALE = 2.0 ** GRID_BITS


def _ste(x: Tensor, q: Tensor | None = None) -> Tensor:
    """``x`` with the value ``q`` (default: ``x`` rounded to the grid) and the gradient of ``x``."""
    q = _q(x) if q is None else q
    return x + (q - x).detach()


def _q(x: Tensor) -> Tensor:
    return torch.round(x * _SCALE) / _SCALE


class BDIAReferenceLayer(BDIALayer):
    """``BDIALayer``'s training forward under plain autograd (see the module docstring)."""

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self.layer(hidden_states, *args, **kwargs)
        args, kwargs = layer_arguments(self.layer, args, kwargs, training=True)
        run = self._enter(hidden_states)
        dtype = hidden_states.dtype
        if self.starts:
            x64 = _ste(hidden_states.double())
            x = x64.to(dtype)
            new = _ste(self.layer(x, *args, **kwargs).double())
        else:
            signs = draw_signs(hidden_states.shape[0], hidden_states.device)
            x64, x = run.cur, hidden_states
            b = residual_update(self.layer(x, *args, **kwargs), x, gammas(signs, self.m, x))
            prev = run.prev
            s = signs.dev.to(prev.dtype).view(-1, *[1] * (prev.dim() - 1))
            qa = s * torch.floor(prev * 2.0 ** (GRID_BITS - self.m)) / _SCALE  # Q[γ·x_prev]: a shift
            new = _ste(gammas(signs, self.m, prev) * prev, qa) + _ste(b.double())
        run.prev, run.cur = x64, new
        out = new.to(dtype)
        self._leave(run, out)
        return out
