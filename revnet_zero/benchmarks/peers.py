"""The same blocks stacked by peer libraries: memcnn 1.5.2 and revlib 1.7.2 (PyPI).

Both take one tensor holding the two streams side by side (``[B, S, 2D]``, split on the last dim),
so the adapters concatenate ``(x1, x2)`` on the way in and split on the way out. They use the blocks'
own ``coupling.f`` (attention) and ``coupling.g`` (FFN) modules, so weights and code are shared
with every other mode. What each library does with precision is its own (docs/design-notes.md):
memcnn casts its inputs to fp32 and runs f/g with autocast off; revlib recomputes in backward
outside autocast.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..couplings import AdditiveCoupling
from ..engine import ReversibleSequence
from .modes import _stream_inputs

PEER_VERSIONS = {"memcnn": "1.5.2", "revlib": "1.7.2"}


def _import(name: str):
    try:
        return __import__(name)
    except ImportError as e:
        raise ImportError(f"mode {name!r} needs {name}=={PEER_VERSIONS[name]} "
                          f"(pip install {name}=={PEER_VERSIONS[name]}): {e}") from e


def _f_and_g(seq: ReversibleSequence) -> list[tuple[nn.Module, nn.Module]]:
    pairs = []
    for i, block in enumerate(seq.blocks):
        c = block.coupling
        if type(c) is not AdditiveCoupling or c.f is None or c.g is None:
            raise ValueError(f"peer stacks need additive couplings with both f and g; block {i} has "
                             f"{type(c).__name__} (f={c.f is not None}, g={c.g is not None})")
        pairs.append((c.f, c.g))
    return pairs


def _split(y: Tensor) -> tuple[Tensor, Tensor]:
    y1, y2 = y.chunk(2, dim=-1)
    return y1, y2


class MemcnnStack(nn.Module):
    """``memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(f, g, split_dim=-1))`` per block."""

    def __init__(self, seq: ReversibleSequence):
        super().__init__()
        memcnn = _import("memcnn")
        self.seq = seq
        self.layers = nn.ModuleList(
            memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(f, g, split_dim=-1),
                                           keep_input=False, keep_input_inverse=False)
            for f, g in _f_and_g(seq))

    def forward(self, x1: Tensor, x2: Tensor | None = None, **kwargs) -> tuple[Tensor, Tensor]:
        if kwargs:
            raise ValueError(f"the memcnn stack takes no keyword arguments, got {sorted(kwargs)}")
        x1, x2 = _stream_inputs(self.seq, x1, x2)
        x = torch.cat([x1, x2], dim=-1)  # a fresh tensor: memcnn frees its input's storage after use
        for layer in self.layers:
            x = layer(x)
        return _split(x)


class RevlibStack(nn.Module):
    """``revlib.ReversibleSequential(f_0, g_0, f_1, g_1, ..., split_dim=-1)``: each module is a half
    step ``(a, b) -> (b, a + m(b))``, so a pair (f, g) is the additive coupling of ``(x1, x2)``."""

    def __init__(self, seq: ReversibleSequence):
        super().__init__()
        revlib = _import("revlib")
        self.seq = seq
        self.net = revlib.ReversibleSequential(*[m for fg in _f_and_g(seq) for m in fg], split_dim=-1)

    def forward(self, x1: Tensor, x2: Tensor | None = None, **kwargs) -> tuple[Tensor, Tensor]:
        if kwargs:
            raise ValueError(f"the revlib stack takes no keyword arguments, got {sorted(kwargs)}")
        x1, x2 = _stream_inputs(self.seq, x1, x2)
        return _split(self.net(torch.cat([x1, x2], dim=-1)))

