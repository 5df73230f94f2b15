"""Two-stream couplings for users who accept a conversion gap (coupling='additive' / 'affine').

No two-stream coupling reproduces a pretrained residual stack exactly; the converter measures the
gap and reports it. The construction (after MEFT, Liao et al. 2023, without their adapters):
the layers alternate between the two streams, each a half step of the engine's fused reversible
backward,

    stream[dst] = λ·stream[dst] + (L_k(stream[src]) - λ·stream[src]),     dst = 0, 1, 0, 1, ...

both streams starting at the embeddings, the last written stream being the output. With λ = 0
this is the pretrained stack; 'additive' is λ = 1 (``y = x + h_k(src)`` with ``h = L - id``);
'affine' takes a constant λ in (0, 1) (default 1/2): the gap shrinks with λ, while the inverse
divides by λ and so amplifies rounding by 1/λ each time a stream is rebuilt. The gap is
O(λ·|h|); BDIA has no gap at all (and no division, thanks to its integer grid).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..couplings import StepCoupling
from ..engine import ReversibleBlock, StreamTape, TapeSlot
from .recorded import recording_active
from .wrapping import WrappedLayer, _Stack, layer_arguments


class ScaledCoupling(StepCoupling):
    """``stream[dst] = scale·stream[dst] + fn(stream[src])`` with a constant ``scale`` (1: additive).

    Example::

        c = ScaledCoupling(f=nn.Linear(64, 64), scale=0.5)
        y1, y2 = c(x1, x2)              # y1 = 0.5·x1 + f(x2), y2 = x2
        x1_, x2_ = c.inverse(y1, y2)
    """

    def __init__(self, f: nn.Module | None = None, g: nn.Module | None = None, scale: float = 1.0):
        super().__init__(f, g)
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {scale!r}")
        self.scale = float(scale)

    def combine(self, x, h):
        return x + h if self.scale == 1 else self.scale * x + h

    def separate(self, y, h, inplace):
        if inplace:
            y.sub_(h)
            return y if self.scale == 1 else y.div_(self.scale)
        return (y - h) / self.scale

    def combine_vjp(self, x, h, dy):
        return (dy if self.scale == 1 else dy * self.scale), dy


class _Branch(nn.Module):
    """``L(x) - scale·x`` for the pretrained layer ``L``, called with the model's arguments."""

    def __init__(self, layer: nn.Module, scale: float):
        super().__init__()
        self.layer, self.scale = layer, scale

    def forward(self, x: Tensor, layer_args: tuple[tuple, dict]) -> Tensor:
        args, kwargs = layer_args
        y = self.layer(x, *args, **kwargs)
        return y - x if self.scale == 1 else y - self.scale * x


class TwoStreamLayer(WrappedLayer):
    """One pretrained layer as a half step of a two-stream reversible stack (see the module docstring).

    Training goes through the engine's ``ReversibleBlock`` (no activations kept, exact gradients);
    eval runs the same two-stream forward, which differs from the pretrained model by the reported gap.
    """

    def __init__(self, layer: nn.Module, index: int, stack: _Stack, starts: bool, ends: bool, dst: int,
                 scale: float):
        super().__init__(index, stack, starts, ends)
        fn = _Branch(layer, scale)
        self.dst = dst
        self.block = ReversibleBlock(ScaledCoupling(f=fn, scale=scale) if dst == 0 else
                                     ScaledCoupling(g=fn, scale=scale))

    @property
    def layer(self) -> nn.Module:
        c = self.block.coupling
        return (c.f if self.dst == 0 else c.g).layer

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        training = self.training and torch.is_grad_enabled()
        if training:
            self._check_layer()
            if recording_active():
                raise ValueError("the model records layer outputs in training (output_router_logits, "
                                 "output_attentions or output_hidden_states); the two-stream couplings do not "
                                 "differentiate them (a load-balancing loss would get no gradient): use "
                                 "coupling='bdia', which does, or turn the recording off")
        args, kwargs = layer_arguments(self.layer, args, kwargs, training)
        run = self._enter(hidden_states)
        if self.starts:
            run.streams, run.tape = [hidden_states, hidden_states], StreamTape()
        y1, y2 = self.block(*run.streams, _tape=TapeSlot(run.tape, self.index, self.ends, self.starts),
                            layer_args=(args, kwargs))
        run.streams = [y1, y2]
        out = run.streams[self.dst]
        self._leave(run, out)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, writes stream {self.dst}, scale={self.block.coupling.scale}"
