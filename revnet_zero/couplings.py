"""Couplings: invertible maps (x1, x2) -> (y1, y2) of two streams.

Two families:

* ``BaseCoupling`` — subclass it with ``forward(x1, x2)`` and ``inverse(y1, y2)``. The engine gets
  exact gradients for any such coupling by inverting without grad, then re-running ``forward`` with
  grad (the coupling's functions run twice per backward: the documented slow path).
* ``StepCoupling`` — the built-in couplings. A list of steps ``stream[dst] = combine(stream[dst],
  fn(stream[src]))``; the engine rebuilds each step's input and differentiates ``fn`` in one pass
  (Gomez et al. 2017), so every sub-function runs exactly once per backward.
"""
from __future__ import annotations

import abc
import enum
import math

import torch
from torch import Tensor, nn


class CouplingType(str, enum.Enum):
    ADDITIVE = "additive"
    AFFINE = "affine"


class BaseCoupling(nn.Module, abc.ABC):
    """An invertible map of two streams ``[B, S, D]`` each. ``inverse(*forward(x1, x2)) == (x1, x2)``.

    Example::

        class Shift(BaseCoupling):
            def __init__(self, d):
                super().__init__()
                self.mlp = nn.Linear(d, d)

            def forward(self, x1, x2):
                return x1, x2 + self.mlp(x1)

            def inverse(self, y1, y2):
                return y1, y2 - self.mlp(y1)
    """

    @abc.abstractmethod
    def forward(self, x1: Tensor, x2: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """``(y1, y2)`` from ``(x1, x2)``."""

    @abc.abstractmethod
    def inverse(self, y1: Tensor, y2: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """``(x1, x2)`` from ``(y1, y2)``."""


class StepCoupling(BaseCoupling):
    """Built-in couplings: ``y1 = combine(x1, F(x2))``, then ``y2 = combine(x2, G(y1))``.

    ``f`` or ``g`` may be left out: the coupling is then a half step that updates one stream.
    Subclasses define the elementwise rule ``combine`` / ``separate`` / ``combine_vjp``.
    ``out_multiplier`` says how wide F's and G's outputs are relative to the stream (affine: 2).
    """

    out_multiplier = 1

    def __init__(self, f: nn.Module | None = None, g: nn.Module | None = None):
        super().__init__()
        self.f = f
        self.g = g

    def steps(self) -> list[tuple[nn.Module, int, int]]:
        """``(fn, src, dst)`` in forward order: ``stream[dst] = combine(stream[dst], fn(stream[src]))``."""
        out = []
        if self.f is not None:
            out.append((self.f, 1, 0))
        if self.g is not None:
            out.append((self.g, 0, 1))
        if not out:
            raise ValueError(
                f"{type(self).__name__} has neither f nor g; pass f=/g= or use it through a layer "
                "(ReversibleAttention, ReversibleFFN) that supplies them"
            )
        return out

    def forward(self, x1: Tensor, x2: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        s = [x1, x2]
        for fn, src, dst in self.steps():
            s[dst] = self.apply_step(fn, s[dst], s[src], **kwargs)
        return s[0], s[1]

    def apply_step(self, fn: nn.Module, x_dst: Tensor, x_src: Tensor, **kwargs) -> Tensor:
        """``combine(x_dst, fn(x_src))``; without grad, tiled along the sequence (see ``seq_tiles``)."""
        tiles = seq_tiles(fn, x_src) if not torch.is_grad_enabled() else [(slice(None),)]
        if len(tiles) == 1:
            return self.combine(x_dst, fn(x_src, **kwargs))
        out = None
        for t in tiles:
            y = self.combine(x_dst[t], fn(x_src[t], **kwargs))
            if out is None:
                out = x_dst.new_empty(x_dst.shape, dtype=y.dtype)
            out[t] = y
        return out

    def inverse(self, y1: Tensor, y2: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        s = [y1, y2]
        for fn, src, dst in reversed(self.steps()):
            s[dst] = self.separate(s[dst], fn(s[src], **kwargs), inplace=False)
        return s[0], s[1]

    # The elementwise rule. ``h`` is a sub-function's output.
    @abc.abstractmethod
    def combine(self, x: Tensor, h: Tensor) -> Tensor:
        """The updated stream from the old one ``x`` and a sub-function's output ``h``."""

    @abc.abstractmethod
    def separate(self, y: Tensor, h: Tensor, inplace: bool) -> Tensor:
        """Inverse of ``combine`` in ``x``; ``inplace`` lets it overwrite ``y``."""

    @abc.abstractmethod
    def combine_vjp(self, x: Tensor, h: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients of ``combine(x, h)`` with respect to ``x`` and ``h`` for output gradient ``dy``."""

    def separate_vjp(self, y: Tensor, h: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, dx, dh)``: ``separate`` in ``y``'s memory, then ``combine_vjp``; what the engine's backward
        runs per step. A subclass may do it in one pass (``revnet_zero.kernels.TritonAffineCoupling``)."""
        x = self.separate(y, h, inplace=True)
        return (x, *self.combine_vjp(x, h, dy))


class AdditiveCoupling(StepCoupling):
    """``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` (RevNet, Reformer). Volume preserving.

    Example::

        c = AdditiveCoupling(f=nn.Linear(64, 64), g=nn.Linear(64, 64))
        y1, y2 = c(x1, x2)
        x1_, x2_ = c.inverse(y1, y2)
    """

    def combine(self, x, h):
        _check_same_shape(x, h, type(self).__name__)
        return x + h

    def separate(self, y, h, inplace):
        return y.sub_(h) if inplace else y - h

    def combine_vjp(self, x, h, dy):
        return dy, dy


class AffineCoupling(StepCoupling):
    """``y1 = x1 * s(a) + t``, where ``(a, t) = F(x2)`` split in two along ``split_dim``; likewise for G.

    The scale ``s = exp(scale_init * tanh(a))`` lies in ``[exp(-scale_init), exp(scale_init)]``,
    bounded away from zero, so the inverse ``x = (y - t) / s`` never divides by a small number.
    F and G must return twice the stream's width along ``split_dim`` (``out_multiplier = 2``).
    The scale is computed in at least float32 whatever the autocast dtype, so forward and recompute agree.
    """

    out_multiplier = 2

    def __init__(self, f: nn.Module | None = None, g: nn.Module | None = None,
                 split_dim: int = -1, scale_init: float = 0.1):
        super().__init__(f, g)
        if not isinstance(split_dim, int):
            raise TypeError(f"split_dim must be an int, got {type(split_dim).__name__}")
        if not (isinstance(scale_init, (int, float)) and math.isfinite(scale_init) and 0 < scale_init <= 5):
            raise ValueError(f"scale_init must be a finite number in (0, 5], got {scale_init!r}")
        self.split_dim = split_dim
        self.scale_init = float(scale_init)

    def _scale_shift(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        d = self.split_dim
        if h.dim() == x.dim() and h.shape[d] % 2:
            raise ValueError(f"AffineCoupling cannot split an odd width {h.shape[d]} along split_dim={d} "
                             f"into scale and shift (function output shape {tuple(h.shape)})")
        if h.dim() != x.dim() or h.shape[d] != 2 * x.shape[d]:
            raise ValueError(
                f"AffineCoupling needs F/G outputs twice the stream width along split_dim={d}: "
                f"stream shape {tuple(x.shape)}, function output shape {tuple(h.shape)}"
            )
        a, t = h.chunk(2, dim=d)
        th = torch.tanh(a.to(torch.promote_types(a.dtype, torch.float32)))
        return torch.exp(self.scale_init * th), t, th

    def combine(self, x, h):
        s, t, _ = self._scale_shift(x, h)
        # the float32 scale must not widen bf16/fp16 streams: the next function expects their dtype
        return (x * s + t).to(torch.promote_types(x.dtype, h.dtype))

    def separate(self, y, h, inplace):
        s, t, _ = self._scale_shift(y, h)
        return y.sub_(t).div_(s) if inplace else ((y - t) / s).to(torch.promote_types(y.dtype, h.dtype))

    def combine_vjp(self, x, h, dy):
        s, _, th = self._scale_shift(x, h)
        dx = dy * s
        da = dx * x * (self.scale_init * (1 - th * th))
        return dx, torch.cat([da, dy], dim=self.split_dim)


def seq_tiles(fn: nn.Module, x: Tensor) -> list[tuple[slice, ...]]:
    """Index tuples that cut ``x [B, S, ...]`` into sequence tiles of ``fn.seq_chunk`` positions.

    A sub-function that sets an integer ``seq_chunk`` declares itself position-wise (an FFN):
    the engine then runs it tile by tile in forward and in the backward recompute, so its wide
    intermediates never exist for the whole sequence at once. Keyword arguments are passed whole.
    """
    chunk = getattr(fn, "seq_chunk", None)
    if not chunk or x.dim() < 2 or x.shape[1] <= chunk:
        return [(slice(None),)]
    return [(slice(None), slice(i, i + chunk)) for i in range(0, x.shape[1], chunk)]


def make_coupling(kind: CouplingType | str | StepCoupling, f: nn.Module | None = None,
                  g: nn.Module | None = None) -> StepCoupling:
    """A built-in coupling from a ``CouplingType``/name, or bind ``f``/``g`` into a rule-only coupling."""
    if isinstance(kind, StepCoupling):
        for name, fn in (("f", f), ("g", g)):
            if fn is not None:
                if getattr(kind, name) is not None:
                    raise ValueError(f"the {type(kind).__name__} passed already has {name} set; "
                                     "pass a fresh coupling to each layer")
                setattr(kind, name, fn)
        return kind
    try:
        kind = CouplingType(kind)
    except ValueError:
        raise ValueError(f"unknown coupling {kind!r}; expected one of "
                         f"{[c.value for c in CouplingType]} or a StepCoupling instance") from None
    return AdditiveCoupling(f, g) if kind is CouplingType.ADDITIVE else AffineCoupling(f, g)


def _check_same_shape(x: Tensor, h: Tensor, who: str) -> None:
    if x.shape != h.shape:
        raise ValueError(f"{who}: function output shape {tuple(h.shape)} differs from the stream's "
                         f"{tuple(x.shape)}")
