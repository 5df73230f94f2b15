"""Autograd plumbing shared by the custom backward passes (the engine, BDIA, the tiled MLP).

Each of them runs a forward without keeping its graph and redoes it inside backward. To redo it
exactly they need the forward's random state (``rng_state`` / ``restored_rng``) and autocast state
(``autocast_state`` / ``autocast_from``); to hand parameter gradients back to autograd rather than
writing ``.grad`` they differentiate detached aliases of the parameters (``leaf_aliases``); to free
tensors early they ask whether the running backward keeps its graph (``keep_graph``) and
differentiate from a graph edge rather than a tensor (``root_edge``).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge


def keep_graph() -> bool:
    """Whether the running backward keeps its graph (``retain_graph=True``); True when unknown."""
    get = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if get is None else bool(get())


def rng_state(device: torch.device):
    """The CPU generator's state, and ``device``'s when it is a CUDA device: what dropout draws from."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def restored_rng(state, device: torch.device):
    """Run the body from the random state ``state`` (``rng_state``'s result; None: as is) and put the
    generators back afterwards, so a recompute draws the forward's numbers and moves no generator."""
    if state is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


@contextlib.contextmanager
def leaf_aliases(module: nn.Module, params: list[Tensor]):
    """Swap ``params`` inside ``module`` for detached leaves that share their storage.

    Differentiating through the aliases leaves the real parameters' hooks and ``.grad`` alone;
    the caller hands the gradients back to autograd, which accumulates them once.
    """
    alias = {id(p): p.detach().requires_grad_() for p in params}
    swapped = []
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and id(p) in alias:
                swapped.append((m, name, p))
                m._parameters[name] = alias[id(p)]
    try:
        yield alias
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def autocast_state(device_type: str):
    """The autocast settings in force for ``device_type``, for ``autocast_from``."""
    return (device_type, torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type), torch.is_autocast_cache_enabled())


def autocast_from(state):
    """An autocast context with the settings ``autocast_state`` recorded (on or off)."""
    device_type, enabled, dtype, cache = state
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled, cache_enabled=cache)


class _GradAs(torch.autograd.Function):
    """A root standing in for ``h`` with dtype ``dtype`` and no memory of its own (an expanded
    scalar); its backward casts the gradient to ``h``'s dtype, so the cast is an ordinary
    intermediate that autograd frees once ``h``'s graph has used it."""

    @staticmethod
    def forward(ctx, h, dtype):
        ctx.dtype = h.dtype
        return h.new_zeros((), dtype=dtype).expand(h.shape)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype), None


def root_edge(h: Tensor, grad_dtype: torch.dtype):
    """The graph edge to differentiate ``h`` from, for a gradient of ``grad_dtype``: with the edge
    alone ``h`` can be freed before its backward, and a dtype cast of the gradient happens inside
    the graph (``_GradAs``), where autograd frees it once used, not at the root, where it is held
    until the whole grad call returns."""
    with torch.enable_grad():
        return get_gradient_edge(_GradAs.apply(h, grad_dtype) if h.dtype != grad_dtype else h)


_ABSENT = object()


class HeldTensors:
    """The tensors a module tree holds in its parameter and buffer slots at one moment, and the
    parameters' version counters then.

    Recorded at a block's forward, so that its recompute in backward runs with the very tensors
    the forward ran with, even when they were swapped in for that call only
    (``torch.func.functional_call``), and refuses parameters edited in place since (plain
    autograd refuses a saved tensor whose version moved).
    """

    def __init__(self, module: nn.Module):
        self.slots = [(m, table, name, t, table is m._parameters)
                      for m in module.modules() for table in (m._parameters, m._buffers)
                      for name, t in table.items() if t is not None]
        self.versions = [t._version if is_param else None for *_, t, is_param in self.slots]
        self.read: list[tuple[str, Tensor, int]] = []   # buffers and keyword tensors (see ``seal``)

    def seal(self, kwargs: dict) -> None:
        """After the forward: record the versions of the buffers and keyword tensors it read. The
        recompute reads them again, so an in-place edit before backward would rebuild other inputs
        and give wrong gradients silently (plain autograd either does not need them or refuses)."""
        buffers = [(f"buffer {name!r}", t) for _, _, name, t, is_param in self.slots if not is_param]
        tensors = buffers + [(f"keyword argument {k!r}", v) for k, v in kwargs.items() if isinstance(v, Tensor)]
        self.read = [(what, t, t._version) for what, t in tensors if not t.is_inference()]

    def parameters(self) -> list[Tensor]:
        """The distinct tensors in parameter slots that require grad, in module order."""
        seen, out = set(), []
        for *_, t, is_param in self.slots:
            if is_param and t.requires_grad and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    def check_versions(self, root: nn.Module, who: str) -> None:
        """Raise like autograd does if a parameter was modified in place since the recording."""
        for (m, _, name, t, _), version in zip(self.slots, self.versions):
            if version is not None and t._version != version:
                qualified = next((f"{p}.{name}" if p else name for p, sub in root.named_modules() if sub is m), name)
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: parameter {qualified!r} of {who} is at version {t._version}; expected version "
                    f"{version}. The reversible backward recomputes the block from its parameters: change "
                    "them only after backward (e.g. optimizer.step() after loss.backward())")
        for what, t, version in self.read:
            if t._version != version:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: {what} of {who} is at version {t._version}; expected version {version}. The "
                    "reversible backward recomputes the block with it: change it only after backward")

    @contextlib.contextmanager
    def restored(self, needed: list[Tensor]):
        """Put the recorded tensors back into their slots for the body, ``needed`` ones as detached
        aliases (by id) that share storage: gradients are taken with respect to the aliases, so the
        real tensors' hooks and ``.grad`` are left to autograd. Yields ``{id(tensor): alias}``."""
        alias = {id(p): p.detach().requires_grad_() for p in needed}
        now = [(table, name, table.get(name, _ABSENT)) for _, table, name, _, _ in self.slots]
        for _, table, name, t, _ in self.slots:
            table[name] = alias.get(id(t), t)
        try:
            yield alias
        finally:
            for table, name, t in reversed(now):
                if t is _ABSENT:
                    table.pop(name, None)
                else:
                    table[name] = t
