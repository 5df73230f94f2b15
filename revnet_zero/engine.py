"""The reversible engine.

Training keeps no per-block activations: each ``ReversibleBlock`` runs its coupling under one
``autograd.Function`` that saves nothing; the blocks of one ``ReversibleSequence`` call share a
``StreamTape`` that holds the current pair of streams during backward. The last block saves its own
outputs (they are alive anyway); backward walks the tape from there, rebuilding each block's inputs
from its outputs in place and differentiating every sub-function once (Gomez et al. 2017).

Parameter gradients are returned by the Function, not written into ``.grad``: hooks, gradient
accumulation, ``torch.autograd.grad``, DDP and FSDP2 see ordinary autograd. Inside backward the
block's modules hold detached aliases of the tensors its forward ran with (its parameters, or those
``torch.func.functional_call`` swapped in), so a user's tensor hooks fire exactly once.

What the backward cannot reproduce is refused rather than differentiated wrongly: parameters
edited in place after forward, streams replaced or edited between two blocks of a run, hooks on a
coupling itself, random draws in forward without ``preserve_rng_state``. Rounding is not refused:
``ReversibleSequence(check_drift=...)`` measures it (docs/numerics.md).
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._autograd import HeldTensors, autocast_from, autocast_state, keep_graph, restored_rng, rng_state, root_edge
from .couplings import BaseCoupling, StepCoupling, seq_tiles
from .drift import DriftProbe
from .ops.kept_attention import AttentionStore, using_store

POLICIES = ("recompute", "store_attention", "offload_attention", "store")
KEPT_ATTENTION = {"store_attention": False, "offload_attention": True}  # policy -> offload?


class StreamTape:
    """The streams of one sequence call during backward; ``pos`` is the block whose outputs they are."""

    def __init__(self):
        self.pos: int | None = None
        self.stores: dict[int, AttentionStore] = {}  # kept attention of blocks, by index
        self.streams: list[Tensor] | None = None
        self.owned = [False, False]  # may we overwrite streams[i] in place?
        # The stream gradients the last backward returned and owns (weak references), for the
        # previous block of the run to accumulate into in place instead of copying them.
        self.handed: list[weakref.ref | None] = [None, None]
        # The outputs the last block's forward returned (weak references) and their versions: the
        # next block of the run must receive these values, since its backward rebuilds them.
        self.out: list[tuple[weakref.ref, int]] | None = None
        self.drift: DriftProbe | None = None  # the sequence's drift check, when asked for

    def load(self, y1: Tensor, y2: Tensor, pos: int, owned: list[bool]) -> None:
        self.streams, self.owned, self.pos = [y1, y2], owned, pos


class TapeSlot(NamedTuple):
    """Where one block call sits in its sequence call: what ``ReversibleSequence`` hands each block.

    A block called on its own gets ``TapeSlot(StreamTape())``: a run of one block.
    """

    tape: StreamTape          # shared by the blocks of one sequence call
    index: int = 0            # the block's position in the sequence
    save_outputs: bool = True  # the last block of a run of recomputing blocks: keeps its outputs
    run_starts: bool = True   # the first block of a run: nobody rebuilds its inputs' producer
    private_in: bool = False  # no hook can see the streams between this block and the one before


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, slot: TapeSlot, kwargs, held: HeldTensors, x1, x2, *params):
        tape, index = slot.tape, slot.index
        ctx.run_starts, ctx.private_in = slot.run_starts, slot.private_in
        ctx.block, ctx.tape, ctx.index, ctx.kwargs, ctx.params, ctx.held = block, tape, index, kwargs, params, held
        ctx.device = x1.device
        ctx.autocast = autocast_state(x1.device.type)
        keep_rng = block.preserve_rng_state
        before = None if keep_rng else rng_state(x1.device)
        c = block.coupling
        keeps = block.policy in KEPT_ATTENTION
        ctx.store = AttentionStore(offload=KEPT_ATTENTION.get(block.policy, False), keep=keeps)
        if keeps:
            tape.stores[index] = ctx.store
        if isinstance(c, StepCoupling):
            s, ctx.rng = [x1, x2], []
            with using_store(ctx.store, recording=True):
                for fn, src, dst in c.steps():
                    ctx.rng.append(rng_state(x1.device) if keep_rng else None)
                    s[dst] = c.apply_step(fn, s[dst], s[src], **kwargs)
            y1, y2 = s
        else:
            ctx.rng = [rng_state(x1.device) if keep_rng else None]
            y1, y2 = c(x1, x2, **kwargs)
        if before is not None:
            _refuse_unreplayable_randomness(before, x1.device, index)
        held.seal(kwargs)
        # The last block of a run of recomputing blocks keeps its outputs: they are the run's
        # outputs, alive anyway (the next stored block or the caller holds them).
        ctx.loads_tape = slot.save_outputs
        if slot.save_outputs:
            ctx.save_for_backward(y1, y2)
            ctx.out_refs = (weakref.ref(y1), weakref.ref(y2))
        return y1, y2

    @staticmethod
    @once_differentiable
    def backward(ctx, dy1, dy2):
        tape, index = ctx.tape, ctx.index
        if ctx.loads_tape:
            # The run's outputs may be overwritten in place by the rebuild (saving a copy of both
            # streams) when nothing can read them again: the graph is not retained and no Python
            # reference to them is left. Otherwise the first rebuild of each stream copies it.
            free = not keep_graph()
            tape.load(*ctx.saved_tensors, pos=index, owned=[free and r() is None for r in ctx.out_refs])
        elif tape.pos != index:
            raise RuntimeError(
                f"reversible backward reached block {index} while the tape holds the outputs of block "
                f"{tape.pos}: a reversible sequence's backward must run from its final outputs through "
                "every block in reverse order"
            )
        # Gradients this block's successor in the run handed over, untouched by anyone else since,
        # are ours to update in place; any other incoming gradient is copied before its first update.
        d_owned = [w is not None and w() is dy for w, dy in zip(tape.handed, (dy1, dy2))]
        if dy1 is dy2:
            d_owned = [False, False]
        tape.handed = [None, None]
        ctx.held.check_versions(ctx.block, f"block {index} ({type(ctx.block).__name__})")
        needed = [p for p, need in zip(ctx.params, ctx.needs_input_grad[6:]) if need]
        if index - 1 in tape.stores and not ctx.run_starts:
            tape.stores[index - 1].prefetch()  # the next block's offloaded attention, while this one runs
        # the recompute runs with the tensors the forward ran with (the needed ones as aliases)
        with ctx.held.restored(needed) as alias, autocast_from(ctx.autocast), \
                using_store(ctx.store, recording=False):
            reverse = _reverse_steps if isinstance(ctx.block.coupling, StepCoupling) else _reverse_generic
            dx1, dx2, grads = reverse(ctx, [dy1, dy2], d_owned, alias)
        pgrads = [grads.get(id(alias[id(p)])) if id(p) in alias else None for p in ctx.params]
        ctx.block._leaves_checked = True
        if not keep_graph():
            ctx.store.clear()  # kept attention is used once per backward
        if ctx.run_starts:
            if tape.drift is not None:
                tape.drift.compare(index, *tape.streams)
            tape.streams, tape.pos = None, None  # free the rebuilt inputs early
        else:
            tape.pos = index - 1
            if ctx.private_in:
                tape.handed = [weakref.ref(t) if own else None for t, own in zip((dx1, dx2), d_owned)]
        return (None, None, None, None, dx1, dx2, *pgrads)


def _check_leaves(ctx, outs: list[Tensor], alias: dict, inputs: list[Tensor]) -> None:
    """On a block's first backward, refuse a recompute whose graph reaches a tensor that requires
    grad but is neither a stream nor held by the block (a parameter reached through a closure or a
    plain attribute): the Function was not given it, so it would silently get no gradient."""
    if getattr(ctx.block, "_leaves_checked", False):
        return
    known = {id(t) for t in (*alias.values(), *inputs, *ctx.held.parameters())}
    seen, todo = set(), [o.grad_fn for o in outs]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if leaf is not None and id(leaf) not in known:
            raise RuntimeError(
                f"block {ctx.index} ({type(ctx.block).__name__}) uses a tensor of shape {tuple(leaf.shape)} that "
                "requires grad but is not held by its coupling (a parameter reached through a closure or a "
                "plain attribute?): it would get no gradient from the reversible backward. Register the "
                "module that holds it under the coupling")
        todo.extend(n for n, _ in node.next_functions)


def _refuse_unreplayable_randomness(before, device: torch.device, index: int) -> None:
    """With ``preserve_rng_state=False`` the recompute cannot draw the forward's random numbers
    (dropout masks), so its gradients would be those of another mask: refuse a forward that drew any."""
    after = rng_state(device)
    if not all(a is None or torch.equal(a, b) for a, b in zip(before, after)):
        raise ValueError(
            f"block {index} drew random numbers in forward (dropout in training mode?) but was built with "
            "preserve_rng_state=False: its backward would recompute with other random numbers and return "
            "wrong gradients. Use preserve_rng_state=True (the default), or dropout 0 / eval mode")


def _accumulate(grads: dict, leaves: list[Tensor], gs) -> None:
    for leaf, g in zip(leaves, gs):
        if g is not None:
            grads[id(leaf)] = g if id(leaf) not in grads else grads[id(leaf)] + g


def _writable(ts: list[Tensor], owned: list[bool], i: int) -> None:
    if not owned[i]:
        ts[i], owned[i] = ts[i].clone(), True


def _reverse_steps(ctx, d: list[Tensor], d_owned: list[bool], alias: dict):
    """Fused backward of a StepCoupling. For each step, last first, and each sequence tile of it:
    compute ``h = fn(stream[src])`` with grad, rebuild ``stream[dst]`` from ``h`` in place, and pull
    ``dh`` back through ``fn``. Every sub-function runs once; the rebuilt streams overwrite the
    tape's buffers, so no second copy of the streams is made."""
    c, tape, kwargs = ctx.block.coupling, ctx.tape, ctx.kwargs
    s, s_owned = tape.streams, tape.owned
    grads: dict[int, Tensor] = {}
    alias_ids = {id(a) for a in alias.values()}
    for (fn, src, dst), rng in zip(reversed(c.steps()), reversed(ctx.rng)):
        leaves = [p for p in fn.parameters() if id(p) in alias_ids]
        _writable(s, s_owned, dst)
        _writable(d, d_owned, src)
        with restored_rng(rng, ctx.device):
            for t in seq_tiles(fn, s[src]):
                with torch.enable_grad():
                    xin = s[src][t].detach().requires_grad_()
                    h = fn(xin, **kwargs)
                    _check_leaves(ctx, [h], alias, [xin])
                with torch.no_grad():
                    hd, dy = h.detach(), d[dst][t]
                    # kernels call site: the rebuild (in place) and its vjp, one pass where the coupling
                    # has a kernel for it (revnet_zero.kernels.TritonAffineCoupling)
                    x, dx, dh = c.separate_vjp(s[dst][t], hd, dy)
                    if dx is not dy:
                        _writable(d, d_owned, dst)
                        d[dst][t].copy_(dx)
                # h is needed no more (the stream is rebuilt): autograd gets a graph edge only, so h
                # is freed now unless the graph saved it. dh is cast to h's dtype inside the graph:
                # autograd holds a root gradient until the whole grad call returns, a cast made
                # there or here would stay alive through the sub-function's backward.
                edge = root_edge(h, dh.dtype)
                del h, hd
                gs = torch.autograd.grad(edge, [xin, *leaves], dh, allow_unused=True)
                if gs[0] is not None:
                    d[src][t].add_(gs[0])
                _accumulate(grads, leaves, gs[1:])
    return d[0], d[1], grads


def _reverse_generic(ctx, d: list[Tensor], d_owned: list[bool], alias: dict):
    """Backward of a user coupling that gives only forward and inverse: invert without grad, then
    differentiate a second forward. Exact, but the coupling's functions run twice."""
    c, tape, kwargs = ctx.block.coupling, ctx.tape, ctx.kwargs
    y1, y2 = tape.streams
    with torch.no_grad(), restored_rng(ctx.rng[0], ctx.device):
        x1, x2 = c.inverse(y1, y2, **kwargs)
    with torch.enable_grad(), restored_rng(ctx.rng[0], ctx.device):
        x1r, x2r = x1.detach().requires_grad_(), x2.detach().requires_grad_()
        o1, o2 = c(x1r, x2r, **kwargs)
    _check_leaves(ctx, [o1, o2], alias, [x1r, x2r])
    leaves = list(alias.values())
    outs = [(o, g) for o, g in ((o1, d[0]), (o2, d[1])) if o.requires_grad]
    gs = torch.autograd.grad([o for o, _ in outs], [x1r, x2r, *leaves], [g for _, g in outs],
                             allow_unused=True)
    tape.streams, tape.owned = [x1, x2], [x1 is not y1, x2 is not y2]
    grads: dict[int, Tensor] = {}
    _accumulate(grads, leaves, gs[2:])
    zero = [torch.zeros_like(x1), torch.zeros_like(x2)]
    d_owned[:] = [False, False]   # no hand-off: the results may alias the incoming gradients
    return (gs[0] if gs[0] is not None else zero[0]), (gs[1] if gs[1] is not None else zero[1]), grads


def _check_streams(x1, x2, who: str) -> None:
    for name, x in (("x1", x1), ("x2", x2)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{who}: {name} must be a Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{who}: streams must be floating point, got {name}.dtype={x.dtype}")
    if x1.shape != x2.shape:
        raise ValueError(f"{who}: the two streams must have the same shape, got x1 {tuple(x1.shape)} "
                         f"and x2 {tuple(x2.shape)}")
    if x1.dtype != x2.dtype or x1.device != x2.device:
        raise ValueError(f"{who}: the two streams must share dtype and device, got {x1.dtype}/{x1.device} "
                         f"and {x2.dtype}/{x2.device}")


def _refuse_stateful(coupling: nn.Module) -> None:
    for name, m in coupling.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            raise ValueError(
                f"ReversibleBlock: sub-module {name!r} is {type(m).__name__}, whose running statistics "
                "would be updated twice (forward and recompute); use LayerNorm/RMSNorm, or "
                "track_running_stats=False"
            )


_TRUSTED_HOOKS = contextvars.ContextVar("revnet_trusted_hooks", default=False)


@contextlib.contextmanager
def trusted_hooks():
    """Declare that the module hooks active inside neither keep nor change the gradients of the
    streams between blocks (profilers, FSDP's unshard/reshard hooks), so the engine may still hand
    those gradients from block to block in place. Without it, a hooked block's boundary copies them."""
    token = _TRUSTED_HOOKS.set(True)
    try:
        yield
    finally:
        _TRUSTED_HOOKS.reset(token)


def _hooked(module: nn.Module) -> bool:
    """Whether a module hook could see (and keep) the block's input or output streams."""
    return not _TRUSTED_HOOKS.get() and bool(module._forward_hooks or module._forward_pre_hooks
                                             or module._backward_hooks or module._backward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as m
    return not _TRUSTED_HOOKS.get() and any(
        getattr(m, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                            "_global_backward_hooks", "_global_backward_pre_hooks"))


def _unchanged(recorded: tuple[weakref.ref, int], x: Tensor) -> bool:
    """Whether ``x`` holds exactly the values of the recorded output: the output itself or a view
    of all of it (as an identity autograd.Function returns, e.g. FSDP2's hooks), not modified in
    place since. The output is alive when compared, so no other tensor can have its address."""
    ref, version = recorded
    y = ref()
    if y is None or x._version != version:
        return False
    return x is y or (x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride()
                      and x.dtype == y.dtype)


def _refuse_functorch(who: str) -> None:
    """The engine's Function keeps a tape across blocks, which torch.func transforms (grad, vmap, jacrev)
    cannot trace; say so rather than let autograd ask for a ``setup_context``."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(
            f"{who}: torch.func transforms (grad, vmap, jacrev, ...) cannot differentiate the reversible "
            "engine. Use torch.func.functional_call with torch.autograd.grad (supported), run under "
            "torch.no_grad() for a forward only, or set policy='store' on the blocks")


def _check_run(slot: TapeSlot, x1: Tensor, x2: Tensor, coupling: BaseCoupling) -> None:
    """Refuse what would make the reversible backward differ from plain autograd's: streams that
    are not the previous block's outputs (its backward rebuilds those from ours), and hooks on the
    coupling itself (the engine runs its steps directly, and does not invert what a hook changed)."""
    if not slot.run_starts:
        out = slot.tape.out
        if out is None or not (_unchanged(out[0], x1) and _unchanged(out[1], x2)):
            i = slot.index
            raise RuntimeError(
                f"block {i} of a reversible sequence did not receive the streams block {i - 1} returned: a "
                f"forward hook on block {i - 1} or a forward pre-hook on block {i} replaced them. The "
                f"backward rebuilds block {i - 1}'s outputs from block {i}'s inputs, so its gradients would "
                "be wrong. Hooks may read the streams; to change them, do it inside a sub-function, or set "
                "policy='store' on these blocks")
    if coupling._forward_hooks or coupling._forward_pre_hooks:
        raise ValueError(
            f"{type(coupling).__name__} has forward hooks of its own, which the reversible engine does not run "
            "the way plain autograd does; register them on the ReversibleBlock or on a sub-function (f, g), "
            "or set policy='store'")


class ReversibleBlock(nn.Module):
    """Runs a coupling so that training keeps none of its activations.

    ``policy``: ``'recompute'`` (default: rebuild inputs from outputs in backward), ``'store_attention'``
    / ``'offload_attention'`` (also keep each attention output and logsumexp, on the GPU or in pinned
    host memory, so the recompute skips attention: see ``ops/kept_attention.py``), or ``'store'``
    (plain autograd: fastest, keeps every activation). Under ``torch.no_grad()`` or when nothing
    needs a gradient, it is a plain forward.

    ``preserve_rng_state``: record the random state before each sub-function, so the recompute
    draws the same dropout masks (default). ``False`` saves that, and refuses (ValueError) a forward
    that draws random numbers (dropout in training), whose gradients would otherwise be those of
    other masks.

    The gradients are plain autograd's or an error: the recompute runs with the tensors the
    forward ran with (also under ``torch.func.functional_call``); a parameter edited in place
    between forward and backward raises as in autograd; streams replaced between two blocks of a
    sequence (a forward hook returning new outputs) raise.

    Example::

        block = ReversibleBlock(AdditiveCoupling(f=nn.Linear(64, 64), g=nn.Linear(64, 64)))
        y1, y2 = block(x1, x2)          # x1, x2: [B, S, 64]
        x1_, x2_ = block.inverse(y1, y2)
    """

    def __init__(self, coupling: BaseCoupling, preserve_rng_state: bool = True, policy: str = "recompute"):
        super().__init__()
        if not isinstance(coupling, BaseCoupling):
            raise TypeError(f"ReversibleBlock needs a BaseCoupling, got {type(coupling).__name__}")
        _refuse_stateful(coupling)
        if isinstance(coupling, StepCoupling):
            in_steps = {id(p) for fn, _, _ in coupling.steps() for p in fn.parameters()}
            stray = [n for n, p in coupling.named_parameters() if id(p) not in in_steps]
            if stray:
                raise ValueError(f"{type(coupling).__name__} has parameters outside its f/g functions "
                                 f"({stray}); the fused backward would miss them: subclass BaseCoupling")
        self.coupling = coupling
        self.preserve_rng_state = preserve_rng_state
        self.policy = policy

    @property
    def policy(self) -> str:
        return self._policy

    @policy.setter
    def policy(self, value: str) -> None:
        if value not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {value!r}")
        if value in KEPT_ATTENTION and not isinstance(self.coupling, StepCoupling):
            raise ValueError(f"policy {value!r} needs a built-in (StepCoupling) coupling; "
                             f"{type(self.coupling).__name__} recomputes through its inverse")
        self._policy = value

    def forward(self, x1: Tensor, x2: Tensor, _tape: TapeSlot | None = None, **kwargs):
        _check_streams(x1, x2, type(self).__name__)
        for k, v in kwargs.items():
            if isinstance(v, Tensor) and v.requires_grad:
                raise ValueError(f"{type(self).__name__}: keyword argument {k!r} requires grad; only the "
                                 "streams and the block's own parameters can receive gradients")
        if _tape is not None and not isinstance(_tape, TapeSlot):
            raise TypeError(f"_tape must be a TapeSlot, got {type(_tape).__name__}")
        slot = _tape if _tape is not None else TapeSlot(StreamTape())
        # what the coupling's modules hold now (torch.func.functional_call swaps in its own tensors)
        held = HeldTensors(self.coupling)
        params = held.parameters()
        needs_grad = torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad or bool(params))
        if not needs_grad or self.policy == "store":
            y1, y2 = self.coupling(x1, x2, **kwargs)
        else:
            _refuse_functorch(type(self).__name__)
            _check_run(slot, x1, x2, self.coupling)
            y1, y2 = _ReversibleFunction.apply(self, slot, kwargs, held, x1, x2, *params)
        # inference tensors (torch.inference_mode) keep no version counter, and no backward follows
        slot.tape.out = None if y1.is_inference() else [(weakref.ref(y1), y1._version),
                                                        (weakref.ref(y2), y2._version)]
        return y1, y2

    def inverse(self, y1: Tensor, y2: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        _check_streams(y1, y2, type(self).__name__)
        return self.coupling.inverse(y1, y2, **kwargs)

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}"


class ReversibleSequence(nn.Module):
    """A stack of reversible blocks whose training memory does not grow with depth.

    Takes ``x1`` (and ``x2``; when left out, ``x2 = x1``), both ``[B, S, D]``, and returns the two
    output streams. The streams are held in ``stream_dtype`` (float32 by default, even under bf16
    autocast: the sub-functions compute in bf16 while the residual sums and their inversion stay
    accurate); ``None`` keeps the input dtype. float64 inputs always keep float64 streams: a float64 run is
    for exactness, and narrowing its streams would silently give float32 gradients (or, with float64
    parameters, a dtype error).

    ``check_drift``: a bound on the relative error of the inputs the backward rebuilds (None: off).
    When set, each training forward keeps a sample of the true inputs of each run of recomputing
    blocks (about 16 positions of each stream) and the backward compares the rebuilt ones with it:
    ``last_drift`` holds the step's largest relative drift, and a RuntimeWarning is issued (once
    per module) when it passes the bound. Off by default because reading the figure waits for the
    device once per step; turn it on for the first steps of a new setup, or keep it on when the
    streams may be small next to what the blocks add (see docs/numerics.md).

    Example::

        seq = ReversibleSequence([AdditiveCoupling(f=mlp(), g=mlp()) for _ in range(12)])
        y1, y2 = seq(x)                 # x: [B, S, D]
        loss = (y1 + y2).pow(2).mean()
        loss.backward()                 # rebuilds every block's inputs; keeps no activations
    """

    def __init__(self, blocks: Iterable[ReversibleBlock | BaseCoupling],
                 stream_dtype: torch.dtype | None = torch.float32, preserve_rng_state: bool = True,
                 check_drift: float | None = None):
        super().__init__()
        wrapped = [b if isinstance(b, ReversibleBlock) else ReversibleBlock(b, preserve_rng_state)
                   for b in blocks]
        if not wrapped:
            raise ValueError("ReversibleSequence needs at least one block")
        self.blocks = nn.ModuleList(wrapped)
        self.stream_dtype = stream_dtype
        self.check_drift = check_drift
        self.last_drift: float | None = None

    @property
    def check_drift(self) -> float | None:
        return self._check_drift

    @check_drift.setter
    def check_drift(self, value: float | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < float("inf")):
            raise ValueError(f"check_drift must be None or a positive finite number (a relative error), "
                             f"got {value!r}")
        self._check_drift = value

    def forward(self, x1: Tensor, x2: Tensor | None = None, **kwargs) -> tuple[Tensor, Tensor]:
        if x2 is None:
            x2 = x1
        _check_streams(x1, x2, type(self).__name__)
        if self.stream_dtype is not None and torch.float64 not in (x1.dtype, x2.dtype):
            x1, x2 = x1.to(self.stream_dtype), x2.to(self.stream_dtype)
        tape, n = StreamTape(), len(self.blocks)
        if self.check_drift is not None and torch.is_grad_enabled():
            tape.drift, self.last_drift = DriftProbe(self, self.check_drift), None
        recompute = [b.policy != "store" for b in self.blocks]
        hooked, global_hooks = [_hooked(b) for b in self.blocks], _global_hooks()
        for i, block in enumerate(self.blocks):
            run_ends = i == n - 1 or not recompute[i + 1]
            run_starts = i == 0 or not recompute[i - 1]
            # No hook can see the streams between block i-1 and block i: block i's input gradients
            # may be handed to block i-1 to update in place.
            private_in = not run_starts and not (hooked[i] or hooked[i - 1] or global_hooks)
            if tape.drift is not None and run_starts and recompute[i]:
                tape.drift.keep(i, x1, x2)
            x1, x2 = block(x1, x2, _tape=TapeSlot(tape, i, run_ends, run_starts, private_in), **kwargs)
        return x1, x2

    def inverse(self, y1: Tensor, y2: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        for block in reversed(self.blocks):
            y1, y2 = block.inverse(y1, y2, **kwargs)
        return y1, y2

    def set_policy(self, policy: str, layers: Iterable[int] | None = None) -> None:
        for i in (range(len(self.blocks)) if layers is None else layers):
            self.blocks[i].policy = policy
