"""BDIA: an exactly reversible form of a pretrained residual stack (Zhang, Lewis, Kleijn, arXiv 2407.09093).

A pretrained layer computes ``x_{k+1} = L_k(x_k) = x_k + h_k(x_k)``. In training, BDIA runs

    x_1     = L_0(x_0)
    x_{k+1} = γ_k·x_{k-1} + (1-γ_k)·x_k + (1+γ_k)·h_k(x_k) = γ_k·x_{k-1} + (1+γ_k)·L_k(x_k) - 2γ_k·x_k

with ``γ_k = ±γ0`` drawn per sample and layer (the mean over the sign is the original update); in
eval ``γ = 0``, so the converted model *is* the pretrained one. Given ``x_{k+1}`` and ``x_k``, one
call of ``L_k`` gives back ``x_{k-1}``, so training keeps no per-layer activations.

Exactness: the activations live on the fixed-point grid of ``grid.py``. The forward is
``X_{k+1} = Q[γ·x_{k-1}] + Q[(1+γ)·L_k(x_k) - 2γ·x_k]``; ``Q[γ·x_{k-1}]`` is a shift that drops
the ``m`` low bits of ``X_{k-1}`` (``γ0 = 2^-m``), and those bits are stored (packed: m bits per
element per layer). The backward walks the layers from the last pair ``(X_K, X_{K-1})`` down,
rebuilding ``X_{k-1}`` bit for bit with the one recompute of ``L_k`` that also gives its gradients.

Gradients: those of the unquantised formula evaluated at the grid values (the rounding ``Q`` is
passed straight through). ``reference.py`` computes the same function with plain autograd, using
``x + (Q(x) - x).detach()`` for every rounding; the tests pin this module to it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .._autograd import autocast_from as _autocast, autocast_state as _autocast_state, keep_graph as _keep_graph
from .._autograd import leaf_aliases as _leaf_aliases, restored_rng as _restored_rng, rng_state as _rng_state
from .._autograd import root_edge
from . import peft_compat
from .grid import (GridStep, Signs, abs_max, check_range, from_grid, gammas, to_grid, update_backward,
                   update_forward)
from .offload import HostQueue, park, take
from .recorded import LayerCall
from .wrapping import WrappedLayer, _Stack, layer_arguments


def draw_signs(batch: int, device: torch.device) -> Signs:
    """Fresh signs for one layer, from the global CPU generator: the host knows them without waiting for
    the device, so a common sign can be a Python number in the update (plain, vectorized kernels)."""
    host = torch.randint(0, 2, (batch,)) * 2 - 1
    values = set(host.tolist())
    common = values.pop() if len(values) == 1 else None
    if device.type == "cpu":
        return Signs(host, common)
    # no copy that waits on the stream (a sync per layer): a fill for a common sign, else a
    # non-blocking copy from pinned memory (the host allocator keeps the block until it is done)
    if common is not None:
        return Signs(torch.full((batch,), common, dtype=host.dtype, device=device), common)
    if device.type == "cuda":
        return Signs(host.pin_memory().to(device, non_blocking=True), None)
    return Signs(host.to(device), None)


def _pack(t: Tensor) -> Tensor:
    return t.detach()  # not t itself: a saved output would then hold its own grad_fn, a cycle that leaks the graph


def _unpack(t: Tensor) -> Tensor:
    return t


def _run_layer(call, x: Tensor) -> tuple[Tensor, Tensor]:
    """``call(x)`` with grad, ``x`` as a leaf: the forward runs the layer exactly like the backward's
    recompute, so attention and matmul back ends that choose kernels by ``requires_grad`` choose the
    same ones and the rebuild is bitwise. The plain saved-tensor hooks keep outer hooks (offloading,
    byte counters) away from this short-lived graph. The BDIA update runs outside it, on values
    (``update_forward`` / ``update_backward``); its gradient is written out in the backward."""
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        xg = x.detach().requires_grad_()
        y = call(xg)
        if not isinstance(y, Tensor):
            raise TypeError(f"a converted layer must return a Tensor, got {type(y).__name__}")
        return xg, y


class _GridPair:
    """The grid pair ``(X_{k+1}, X_k)`` of one run (with offload, ``Parked`` ones); ``pos`` is the layer
    ``k``. ``peak``: the largest |x| put on the grid so far in the forward, checked once at the run's end
    (not a host sync per layer)."""

    def __init__(self):
        self.pair: tuple[Tensor, Tensor] | None = None
        self.pos: int | None = None
        self.peak: Tensor | None = None


class _BDIAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, call, tape, slot, x_prev, x, *params):
        index, starts, ends, signs, m, queue, step = slot
        offload = queue is not None
        ctx.layer, ctx.call, ctx.tape, ctx.params = layer, call, tape, params
        ctx.index, ctx.starts, ctx.ends, ctx.m, ctx.dtype = index, starts, ends, m, x.dtype
        ctx.step = step
        ctx.device, ctx.autocast, ctx.offload, ctx.queue = x.device, _autocast_state(x.device.type), offload, queue
        if starts:
            tape.peak = abs_max(x.detach())
            X_cur = to_grid(x)
            x = from_grid(X_cur, x.dtype)  # x_0 on the grid
            X_cur = park(X_cur, queue)  # not needed again before the next layer's step
        else:
            X_cur, X_prev = tape.pair  # x is from_grid(X_cur): the previous layer returned it
            tape.pair = None           # X_prev is ours alone now: freed as soon as it is used
        ctx.rng = _rng_state(x.device)
        saved = []
        if starts:
            y = _run_layer(call, x)[1].detach()
            X_next, peak = to_grid(y), abs_max(y)
            del y
            out = from_grid(X_next, x.dtype)
        else:
            # X_prev is the tape's alone (a run's saved pair is its last layer's X_next, X_cur): given up here.
            # Eagerly it is fetched only once the update is on the grid, so its copy and to_grid's
            # temporaries do not coexist (and with offload the eager step runs in place). The layer's
            # output goes in unnamed, so the eager update can free it once it has made b.
            X_next, packed, peak, out = update_forward(_run_layer(call, x)[1].detach(), x, lambda: take(X_prev),
                                                       signs, m, step=None if offload else step)
            del X_prev
            saved = [signs.dev, park(packed, queue)]
            ctx.common = signs.common
        X_next = park(X_next, queue)
        tape.peak = torch.maximum(tape.peak, peak)
        tape.pair, tape.pos = (X_next, X_cur), index
        if ends:  # the run's outputs: kept for its backward, which starts here
            check_range(tape.peak)  # the backward's recompute gives the same values: no check there
            saved += [X_next, X_cur]
            tape.pair = None
        if offload:
            ctx.kept = saved   # parked tensors and the signs; nothing for autograd's saved-tensor hooks
        else:
            ctx.save_for_backward(*saved)
        sides = call.take_sides()   # recorded tensors (router logits): outputs too, see recorded.py
        return (out, *[s.detach() for s in sides]) if sides else out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *dsides):
        tape = ctx.tape
        saved = ctx.kept if ctx.offload else ctx.saved_tensors
        if ctx.offload and not _keep_graph():
            ctx.kept = None   # autograd frees saved tensors after a backward; parked ones are freed here
        if ctx.ends:
            tape.pair, tape.pos = (saved[-2], saved[-1]), ctx.index
        elif tape.pos != ctx.index:
            raise RuntimeError(f"BDIA backward reached layer {ctx.index} while the tape holds the outputs of layer "
                               f"{tape.pos}: the backward must run from the run's outputs through every layer")
        X_next, X_cur = tape.pair
        x = from_grid(take(X_cur), ctx.dtype)   # with offload the host copy stays in X_cur for the next pair
        signs = None if ctx.starts else Signs(saved[0], ctx.common)
        gamma = None if ctx.starts else gammas(signs, ctx.m, x)
        needed = [p for p, need in zip(ctx.params, ctx.needs_input_grad[6:]) if need]
        with _leaf_aliases(ctx.layer, needed) as alias, _autocast(ctx.autocast), \
                _restored_rng(ctx.rng, ctx.device):
            xg, y = _run_layer(ctx.call, x)
        leaves = [alias[id(p)] for p in needed]
        # the graph keeps what it needs; y's values wait in yd (with offload, in host memory) for the step
        yd, edge = park(y.detach(), None if ctx.starts else ctx.queue), root_edge(y, dout.dtype)
        del y
        # the update b = (1+γ)·y - 2γ·x is linear: dout·(1+γ) flows to y, through the layer
        g = gamma if gamma is None or isinstance(gamma, float) else gamma.to(dout.dtype)
        dy = dout if ctx.starts else dout * (1 + g)
        sides = ctx.call.take_sides()   # the recompute's recorded tensors, if the forward returned any
        gs = torch.autograd.grad([edge, *sides], [xg, *leaves], [dy, *dsides], allow_unused=True)
        del sides
        del dy
        dx = gs[0] if gs[0] is not None else torch.zeros_like(xg)
        by_id = {id(p): g for p, g in zip(needed, gs[1:])}
        pgrads = [by_id.get(id(p)) for p in ctx.params]
        if ctx.starts:
            tape.pair, tape.pos = None, None
            return (None, None, None, None, None, dx, *pgrads)
        # and -2γ·dout straight to x; dx is autograd's fresh buffer (or our dy), ours to change
        dx = dx.add_(dout, alpha=-2 * g) if isinstance(g, float) else dx.addcmul_(dout, g, value=-2)
        with torch.no_grad():
            # with offload, X_next is a fresh copy from host memory: X_prev may overwrite it
            X_prev = update_backward(take(yd), x, take(X_next), take(saved[1]), signs, ctx.m,
                                     overwrite=ctx.offload, step=ctx.step)
            del yd, X_next, saved   # X_next's host copy too, before X_prev's is made
            tape.pair = None
        # the previous layer turns X_prev into its input at once: with offload its device copy is held for that
        tape.pair, tape.pos = (X_cur, park(X_prev, ctx.queue, keep=True)), ctx.index - 1
        return (None, None, None, None, dout * g, dx, *pgrads)


class BDIALayer(WrappedLayer):
    """A pretrained decoder layer run as one BDIA step (see the module docstring).

    Eval or ``torch.no_grad()``: the layer itself, exactly. Training with grad: the BDIA update
    with fresh signs ``γ = ±gamma0`` per sample, keeping only the ``m`` lost bits per element.
    ``offload``: the model's ``HostQueue``, through which the grid tensors and the kept bits wait in
    pinned host memory between their uses (None: they stay on the device). ``grid_step``: the model's
    ``GridStep`` (how the update and grid step run; None: eagerly). Both are shared by the model's layers.
    """

    def __init__(self, layer: nn.Module, index: int, stack: _Stack, starts: bool, ends: bool, m: int,
                 offload: HostQueue | None = None, grid_step: GridStep | None = None):
        super().__init__(index, stack, starts, ends)
        self.layer, self.m, self.offload, self.grid_step = layer, m, offload, grid_step

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self.layer(hidden_states, *args, **kwargs)
        self._check_layer()
        args, kwargs = layer_arguments(self.layer, args, kwargs, training=True)
        run = self._enter(hidden_states)
        if self.starts:
            run.tape = _GridPair()
        signs = None if self.starts else draw_signs(hidden_states.shape[0], hidden_states.device)
        params = [p for p in self.layer.parameters() if p.requires_grad]
        slot = (self.index, self.starts, self.ends, signs, self.m, self.offload, self.grid_step)
        call = _Call(self.layer, args, kwargs)
        out = _BDIAFunction.apply(self.layer, call, run.tape, slot, run.prev, hidden_states, *params)
        if not isinstance(out, torch.Tensor):   # the layer's recorded tensors came back too
            out, sides = out[0], out[1:]
            call.recording.put(sides)
        run.prev = hidden_states
        self._leave(run, out)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma0=1/{2 ** self.m}" + (", offload" if self.offload is not None else "")


class _Call(LayerCall):
    """``layer(x, *args, **kwargs)``: the layer with the arguments the model passed it (``LayerCall``)."""

    def __call__(self, x: Tensor) -> Tensor:
        with peft_compat.adapter_input_casts_off(self.layer, x.device.type):
            return super().__call__(x)
