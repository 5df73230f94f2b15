"""How converted layers sit inside a Hugging Face model.

Each decoder layer in the model's list (``model.h`` for GPT-2, ``model.layers`` for Llama, Mistral,
Qwen2, ...) is replaced by a wrapper module holding it. The model's own ``forward`` still builds
the masks, position ids and rotary embeddings and calls the layers one by one; the wrappers pass
those arguments through to the original layer, so its code and weights are used unchanged.

A reversible scheme needs more than the one hidden state the model's loop hands from layer to
layer (BDIA: the previous one too; two streams: the other stream). The wrappers of one model
share a ``_Stack`` whose ``run`` holds that extra state for the current forward pass. A *run* is
a maximal sequence of consecutive reversible layers; a layer that could not be made reversible
(run under activation checkpointing instead) ends one run, and the next reversible layer starts another.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # "cache": transformers >= 5.24


class _Stack:
    """State shared by the wrapped layers of one model; ``run`` lives only during a forward pass."""

    def __init__(self):
        self.run: _Run | None = None


class _Run:
    def __init__(self, start: int):
        self.next = start          # index of the layer expected next
        self.out: Tensor | None = None    # what the previous layer returned to the model's loop
        self.prev: Tensor | None = None   # BDIA: the input of the previous layer
        self.streams: list[Tensor] | None = None  # two streams: both
        self.tape = None
        self.cur: Tensor | None = None   # reference: the float64 stream


class WrappedLayer(nn.Module):
    """Base of the converted layers: ``index`` in the layer list; ``starts``/``ends``: first/last of its run."""

    def __init__(self, index: int, stack: _Stack, starts: bool, ends: bool):
        super().__init__()
        self.index, self.starts, self.ends = index, starts, ends
        self._stack = stack

    def _enter(self, hidden_states: Tensor) -> _Run:
        stack = self._stack
        if self.starts:
            stack.run = _Run(self.index)
        else:
            run = stack.run
            if run is None or run.next != self.index or hidden_states is not run.out:
                raise RuntimeError(
                    f"converted layer {self.index} ({type(self.layer).__name__}) did not receive the output of "
                    f"layer {self.index - 1}: the converted layers must be called in order, each on the previous "
                    "one's output, by the model's own forward"
                )
        return stack.run

    def _leave(self, run: _Run, out: Tensor) -> None:
        run.next, run.out = self.index + 1, out
        if self.ends:
            self._stack.run = None

    def _check_layer(self) -> None:
        if getattr(self.layer, "gradient_checkpointing", False):
            raise ValueError(f"layer {self.index} has Hugging Face gradient checkpointing enabled, which would "
                             "recompute it a second time inside the reversible backward; call "
                             "model.gradient_checkpointing_disable()")

    def extra_repr(self) -> str:
        return f"index={self.index}, starts={self.starts}, ends={self.ends}"


def _tensors(obj):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def layer_arguments(layer: nn.Module, args: tuple, kwargs: dict, training: bool) -> tuple[tuple, dict]:
    """The arguments the model passed to ``layer`` after the hidden states, made safe to run twice.

    In training, the KV cache is dropped (``past_key_values=None``, ``use_cache=False``): the backward
    re-runs the layer, which would append its keys and values a second time. Training on top of a
    non-empty cache (a prefix) is refused, and so is any extra argument that requires grad: only the
    hidden states and the layer's parameters receive gradients.
    """
    if not training:
        return args, kwargs
    sig = inspect.signature(layer.forward)
    bound = sig.bind(None, *args, **kwargs)
    extra = [bound.arguments[p.name] for p in sig.parameters.values()
             if p.kind is p.VAR_KEYWORD and p.name in bound.arguments]  # the **kwargs dict, if any
    for where in [bound.arguments, *extra]:
        for name in _CACHE_ARGS:
            cache = where.get(name)
            cached = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
            if cached > 0:
                raise ValueError(f"training forward with a non-empty KV cache ({cached} tokens) is not supported "
                                 "by the reversible layers; pass no KV cache (cache / past_key_values)")
            if name in where:
                where[name] = None
        if "use_cache" in where:
            where["use_cache"] = False
    for name, value in bound.arguments.items():
        if any(t.requires_grad for t in _tensors(value)):
            raise ValueError(f"argument {name!r} of layer {type(layer).__name__} requires grad; only the hidden "
                             "states and the layer's own parameters can receive gradients in a reversible layer")
    return bound.args[1:], bound.kwargs


class CheckpointedLayer(WrappedLayer):
    """The fallback for a layer that cannot be made reversible: activation checkpointing (it keeps its
    input and recomputes itself once in backward). Eval and ``torch.no_grad()`` run it as is."""

    def __init__(self, layer: nn.Module, index: int, stack: _Stack):
        super().__init__(index, stack, starts=False, ends=False)
        self.layer = layer

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self.layer(hidden_states, *args, **kwargs)
        self._check_layer()
        args, kwargs = layer_arguments(self.layer, args, kwargs, training=True)
        return checkpoint(self.layer, hidden_states, *args, use_reentrant=False, **kwargs)
