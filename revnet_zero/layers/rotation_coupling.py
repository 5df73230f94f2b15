"""Rotation and orthogonal couplings: volume-preserving maps of the two streams.

* ``RotationCoupling`` — ``y = R(theta(u)) x + t(u)``: the updated stream ``x`` is turned by a
  product of 2x2 block rotations whose angles, like the shift ``t``, are computed from the *other*
  stream ``u``. A rotation whose angle depended on the stream it rotates would not be invertible in
  closed form; this one is: ``x = R(theta(u))^T (y - t(u))``. It is a ``StepCoupling``, so the engine
  rebuilds and differentiates each sub-function once per backward.
* ``OrthogonalMixing`` — ``[y1; y2] = Q [x1; x2]`` with ``Q`` a per-channel 2x2 rotation of the pair of
  streams (angle fixed, or learned). ``OrthogonalMixCoupling`` runs a ``StepCoupling`` and then mixes.
  Both are ``BaseCoupling``s (the mixing angle is a parameter outside F and G), so the engine takes its
  generic path for them: exact gradients, the coupling's functions run twice per backward.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .coupling_layers import BaseCoupling, StepCoupling

# Two pairings of the last dimension: adjacent (x0, x1), (x2, x3), ... and halves (x_k, x_{k+D/2}).
# Rotating in one then the other mixes every coordinate with three others.
PAIRINGS = ("adjacent", "halves")


def _pairs(x: Tensor, pairing: str) -> tuple[Tensor, Tensor]:
    """The two members of each pair of ``x [..., D]`` as views ``[..., D/2]``."""
    if pairing == "adjacent":
        v = x.unflatten(-1, (-1, 2))
        return v[..., 0], v[..., 1]
    v = x.unflatten(-1, (2, -1))
    return v[..., 0, :], v[..., 1, :]


def _join(a: Tensor, b: Tensor, pairing: str) -> Tensor:
    """Inverse of ``_pairs``: ``[..., D/2]`` twice -> ``[..., D]``."""
    if pairing == "adjacent":
        return torch.stack([a, b], dim=-1).flatten(-2)
    return torch.cat([a, b], dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor, pairing: str) -> Tensor:
    """Each pair ``(a, b)`` of ``x [..., D]`` turned by its angle: ``(a cos - b sin, a sin + b cos)``;
    ``cos``, ``sin``: ``[..., D/2]``. Pass ``-sin`` to turn back."""
    a, b = _pairs(x, pairing)
    return _join(a * cos - b * sin, a * sin + b * cos, pairing)


def angle_grad(dy: Tensor, rotated: Tensor, pairing: str) -> Tensor:
    """d<dy, R(theta) x>/d theta per pair, from the rotated ``R(theta) x``: ``dy_b r_a - dy_a r_b``."""
    da, db = _pairs(dy, pairing)
    ra, rb = _pairs(rotated, pairing)
    return db * ra - da * rb


class RotationCoupling(StepCoupling):
    """``y1 = R(theta_F(x2)) x1 + t_F(x2)``, then ``y2 = R(theta_G(y1)) x2 + t_G(y1)``.

    F and G return ``[B, S, 2 D]`` = ``[angles (D), shift (D)]`` (``out_multiplier = 2``). The D
    angles drive two layers of 2x2 rotations: D/2 angles turn adjacent pairs, the other D/2 turn
    pairs ``(k, k + D/2)``; ``R`` is their product, an orthogonal matrix, so ``|det| = 1``. The angles
    are taken in at least float32 whatever the autocast dtype, so forward and recompute agree.
    The stream width D must be even.

    Example::

        c = RotationCoupling(f=nn.Linear(64, 128), g=nn.Linear(64, 128))
        y1, y2 = c(x1, x2)                          # x1, x2: [B, S, 64]
        x1_, x2_ = c.inverse(y1, y2)
    """

    out_multiplier = 2

    def _angles(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        D = x.shape[-1]
        if D % 2:
            raise ValueError(f"RotationCoupling rotates pairs of channels: the stream width must be even, "
                             f"got stream shape {tuple(x.shape)}")
        if h.dim() != x.dim() or h.shape[-1] != 2 * D:
            raise ValueError(f"RotationCoupling needs F/G outputs twice the stream width (angles, shift): "
                             f"stream shape {tuple(x.shape)}, function output shape {tuple(h.shape)}")
        a, t = h.chunk(2, dim=-1)
        a = a.to(torch.promote_types(a.dtype, torch.float32))
        return torch.cos(a), torch.sin(a), t

    def combine(self, x, h):
        cos, sin, t = self._angles(x, h)
        k = cos.shape[-1] // 2
        u = rotate(x, cos[..., :k], sin[..., :k], PAIRINGS[0])
        return rotate(u, cos[..., k:], sin[..., k:], PAIRINGS[1]) + t

    def separate(self, y, h, inplace):
        cos, sin, t = self._angles(y, h)
        k = cos.shape[-1] // 2
        u = rotate(y.sub_(t) if inplace else y - t, cos[..., k:], -sin[..., k:], PAIRINGS[1])
        x = rotate(u, cos[..., :k], -sin[..., :k], PAIRINGS[0])
        return y.copy_(x) if inplace else x

    def combine_vjp(self, x, h, dy):
        cos, sin, _ = self._angles(x, h)
        k = cos.shape[-1] // 2
        u = rotate(x, cos[..., :k], sin[..., :k], PAIRINGS[0])
        d_second = angle_grad(dy, rotate(u, cos[..., k:], sin[..., k:], PAIRINGS[1]), PAIRINGS[1])
        du = rotate(dy, cos[..., k:], -sin[..., k:], PAIRINGS[1])
        d_first = angle_grad(du, u, PAIRINGS[0])
        dx = rotate(du, cos[..., :k], -sin[..., :k], PAIRINGS[0])
        da = torch.cat([d_first, d_second], dim=-1).to(h.dtype)
        return dx, torch.cat([da, dy.to(h.dtype)], dim=-1)


class OrthogonalMixing(BaseCoupling):
    """``y1 = cos(phi) x1 - sin(phi) x2``, ``y2 = sin(phi) x1 + cos(phi) x2``, one angle per channel.

    ``phi`` starts at ``angle`` (a float, or a ``[D]`` tensor); ``learned=True`` makes it a parameter,
    ``False`` a fixed buffer (``angle = pi/4`` averages and differences the streams). Exact inverse:
    the transposed rotation. Streams ``[..., D]``.

    Example::

        mix = OrthogonalMixing(d_model=64, angle=math.pi / 4, learned=False)
        y1, y2 = mix(x1, x2)
        x1_, x2_ = mix.inverse(y1, y2)
    """

    def __init__(self, d_model: int, angle: float | Tensor = 0.0, learned: bool = True):
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        phi = torch.as_tensor(angle, dtype=torch.float32).expand(d_model).clone()
        if not torch.isfinite(phi).all():
            raise ValueError(f"angle must be finite, got {angle!r}")
        if learned:
            self.angle = nn.Parameter(phi)
        else:
            self.register_buffer("angle", phi)

    def _cos_sin(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[-1] != self.angle.shape[0]:
            raise ValueError(f"OrthogonalMixing has {self.angle.shape[0]} channels, got streams of shape "
                             f"{tuple(x.shape)}")
        phi = self.angle.to(torch.promote_types(x.dtype, torch.float32))
        return torch.cos(phi), torch.sin(phi)

    def forward(self, x1: Tensor, x2: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        c, s = self._cos_sin(x1)
        return (c * x1 - s * x2).to(x1.dtype), (s * x1 + c * x2).to(x2.dtype)

    def inverse(self, y1: Tensor, y2: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        c, s = self._cos_sin(y1)
        return (c * y1 + s * y2).to(y1.dtype), (c * y2 - s * y1).to(y2.dtype)


class OrthogonalMixCoupling(BaseCoupling):
    """A ``StepCoupling`` followed by ``OrthogonalMixing`` of its two output streams.

    ``inverse`` unmixes, then inverts the inner coupling. Keyword arguments reach the inner coupling's
    sub-functions. A ``BaseCoupling``: the engine runs F and G twice per backward (inverse, then a
    differentiated forward) and the kept-attention policies do not apply to it.

    Example::

        c = OrthogonalMixCoupling(AdditiveCoupling(f=nn.Linear(64, 64), g=nn.Linear(64, 64)), d_model=64)
        y1, y2 = c(x1, x2)
    """

    def __init__(self, inner: StepCoupling, d_model: int, angle: float = 0.0, learned: bool = True):
        super().__init__()
        if not isinstance(inner, StepCoupling):
            raise TypeError(f"OrthogonalMixCoupling wraps a StepCoupling, got {type(inner).__name__}")
        self.inner = inner
        self.mix = OrthogonalMixing(d_model, angle, learned)

    @property
    def out_multiplier(self) -> int:
        return self.inner.out_multiplier

    def forward(self, x1: Tensor, x2: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        return self.mix(*self.inner(x1, x2, **kwargs))

    def inverse(self, y1: Tensor, y2: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        return self.inner.inverse(*self.mix.inverse(y1, y2), **kwargs)


__all__ = ["OrthogonalMixCoupling", "OrthogonalMixing", "RotationCoupling", "angle_grad", "rotate"]
