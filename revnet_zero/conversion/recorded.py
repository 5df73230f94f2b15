"""Tensors that Hugging Face's output recorders collect inside a converted layer (router logits, ...).

Recent ``transformers`` collect extra outputs (a mixture-of-experts layer's ``router_logits``, which
the auxiliary load-balancing loss is computed from; ``attentions``) with forward hooks that append
to a collector living for one model call. Inside a reversible layer that tensor is made in the
forward's short-lived graph, from a detached copy of the layer's input: a loss on it would reach
the router's weights but never the layer's input, so the earlier layers would miss that part of
their gradient (measured: 20-40% relative error on a tiny Qwen3-MoE with ``router_aux_loss_coef=1``).

``LayerCall`` fixes that: on the layer's first call it notes which collected tensors require
grad; the converted layer's autograd Function returns them (detached) as extra outputs and puts
those outputs back in the collector, so the loss on them flows into the Function's backward. There
the recompute runs the layer under a fresh collector laid out like the forward's, giving the same
tensors again (same input bits, same weights: the same router decisions), and they are
differentiated together with the layer's output.

The collector is looked up in ``sys.modules``: nothing here imports ``transformers``.
"""
from __future__ import annotations

import contextlib
import sys

from torch import Tensor, nn

_CAPTURING = "transformers.utils.output_capturing"


def _collector_var():
    module = sys.modules.get(_CAPTURING)
    return getattr(module, "_active_collector", None)


def recording_active() -> bool:
    """Whether a model call is collecting layer outputs now (a non-empty collector)."""
    var = _collector_var()
    collector = var.get() if var is not None else None
    return bool(collector)


class Recording:
    """Where one layer call's recorded tensors sit in the model call's collector.

    ``before``: each list's length before the call; ``meta``: the collector's other entries
    (which hidden states to keep, ...); ``slots``: ``(key, index)`` of each new tensor that requires grad."""

    def __init__(self, collector: dict):
        self.collector = collector
        self.before = {k: len(v) for k, v in collector.items() if isinstance(v, list)}
        self.meta = {k: v for k, v in collector.items() if not isinstance(v, list)}
        self.slots: list[tuple[str, int]] = []

    def finish(self) -> list[Tensor]:
        """The tensors the call added that require grad (the layer's side outputs)."""
        for key, n in self.before.items():
            for i in range(n, len(self.collector[key])):
                t = self.collector[key][i]
                if isinstance(t, Tensor) and t.requires_grad:
                    self.slots.append((key, i))
        return [self.collector[k][i] for k, i in self.slots]

    def put(self, tensors) -> None:
        """Replace the recorded tensors by ``tensors`` (the converted layer's outputs)."""
        for (key, i), t in zip(self.slots, tensors, strict=True):
            self.collector[key][i] = t

    @contextlib.contextmanager
    def replay(self):
        """A fresh collector laid out like the forward's, active inside the block; yields a function
        returning the tensors recorded at the forward's slots."""
        fresh = {**self.meta, **{k: [None] * n for k, n in self.before.items()}}
        var = _collector_var()
        token = var.set(fresh)
        try:
            yield lambda: [fresh[k][i] for k, i in self.slots]
        finally:
            var.reset(token)


class LayerCall:
    """``layer(x, *args, **kwargs)`` with the model's arguments; ``sides``: the recorded tensors of the
    latest call (``Recording``), in the same order on the forward's call and on every recompute."""

    def __init__(self, layer: nn.Module, args: tuple, kwargs: dict):
        self.layer, self.args, self.kwargs = layer, args, kwargs
        self.recording: Recording | None = None
        self.called = False
        self.sides: list[Tensor] = []

    def __call__(self, x: Tensor) -> Tensor:
        if not self.called:
            self.called = True
            var = _collector_var()
            collector = var.get() if var is not None else None
            self.recording = Recording(collector) if collector else None
            y = self.layer(x, *self.args, **self.kwargs)
            self.sides = self.recording.finish() if self.recording else []
            return y
        if not (self.recording and self.recording.slots):
            return self.layer(x, *self.args, **self.kwargs)
        with self.recording.replay() as recorded:
            y = self.layer(x, *self.args, **self.kwargs)
        self.sides = recorded()
        if len(self.sides) != len(self.recording.slots) or any(t is None for t in self.sides):
            raise RuntimeError(f"the recompute of {type(self.layer).__name__} recorded different outputs from its "
                               "forward; its recorded tensors (router logits, ...) cannot be differentiated")
        return y

    def take_sides(self) -> list[Tensor]:
        """The side outputs of the latest call, handed over (the call keeps no reference)."""
        sides, self.sides = self.sides, []
        return sides
