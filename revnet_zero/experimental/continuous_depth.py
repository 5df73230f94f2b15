"""Continuous-depth reversible networks: a transformer vector field integrated over depth ``t in [0, t1]``.

With a reversible integrator (``ode_solvers``) training keeps only the final state: backward rebuilds
each step's input from its output with the closed-form inverse, re-runs that step with grad, and pulls
the gradient through it. The gradients equal backpropagation through the unrolled solver (the same
arithmetic, up to the rounding of the rebuilt states), and memory does not grow with the number of
steps. Adaptive stepping chooses step sizes from a local error estimate in forward, keeps the accepted
ones and replays them in backward; the step sizes are constants of the computation (no gradient flows
through the step-size controller, as if they were detached).

``ode_solver='dopri5'`` is not reversible: its backward integrates the continuous adjoint equations
(Chen et al. 2018) back from the final state, re-solving the state backwards in time. Those gradients
are an approximation of the solver's gradients whose error follows the tolerance; the output says so
(``exact_gradients=False``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from ..layers.reversible_attention import SelfAttention
from ..layers.reversible_ffn import FeedForward
from ..models.config import default_d_ff
from .ode_solvers import (
    SOLVERS,
    ReversibleSolver,
    check_ratio,
    dopri5_solve,
    error_ratio,
    next_step,
)

DEPTH_FUNCTIONS = ("fixed", "adaptive")
EXACT_SOLVERS = tuple(SOLVERS)


@dataclass
class ContinuousDepthConfig:
    """Options of ``ContinuousDepthRevNet``.

    Example::

        cfg = ContinuousDepthConfig(d_model=64, ode_solver="leapfrog", num_steps=16)
    """

    d_model: int = 256                 # width of the state z [B, S, D]
    num_heads: int | None = None       # attention heads of the vector field; None = max(1, d_model // 64)
    d_ff: int | None = None            # SwiGLU width of the vector field; None = 8/3 d_model rounded to 128
    # exact: 'leapfrog' (alias 'mali'), 'reversible_heun', 'momentum'; 'dopri5': approximate adjoint
    ode_solver: str = "reversible_heun"
    depth_function: str = "fixed"      # 'fixed': num_steps equal steps; 'adaptive': steps from the local error
    num_steps: int = 8                 # steps of a fixed solve; an adaptive solve's first step is t1 / num_steps
    t1: float = 1.0                    # integrate over depth [0, t1]
    tolerance: float = 1e-3            # adaptive: largest accepted RMS local error relative to 1 + |z|
    max_depth: int = 100               # adaptive: most accepted steps; more raises ValueError
    momentum: float = 0.9              # gamma of the 'momentum' solver, in (0, 1)
    causal: bool = True                # causal attention inside the vector field

    def __post_init__(self):
        if self.num_heads is None and isinstance(self.d_model, int):
            self.num_heads = max(1, self.d_model // 64)
        if self.d_ff is None and isinstance(self.d_model, int):
            self.d_ff = default_d_ff(self.d_model, "swiglu")
        for name in ("d_model", "num_heads", "d_ff", "num_steps", "max_depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.ode_solver not in EXACT_SOLVERS + ("dopri5",):
            raise ValueError(f"ode_solver must be one of {list(EXACT_SOLVERS + ('dopri5',))}, "
                             f"got {self.ode_solver!r}")
        if self.depth_function not in DEPTH_FUNCTIONS:
            raise ValueError(f"depth_function must be one of {DEPTH_FUNCTIONS}, got {self.depth_function!r}")
        if self.ode_solver == "dopri5" and self.depth_function != "adaptive":
            raise ValueError("ode_solver='dopri5' is an adaptive solver: use depth_function='adaptive', or a "
                             f"fixed-step exact solver {list(EXACT_SOLVERS)}")
        for name in ("t1", "tolerance"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 < self.momentum < 1):
            raise ValueError(f"momentum must lie in (0, 1), got {self.momentum!r}")
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into num_heads={self.num_heads} heads of even size")


@dataclass
class ContinuousDepthOutput:
    hidden: Tensor                     # [B, S, D]: the state at t1
    step_sizes: list[float]            # accepted step sizes, in order
    nfe: int                           # vector-field evaluations in forward (rejected steps included)
    exact_gradients: bool              # False for dopri5: gradients from the continuous adjoint
    gradient_method: str = field(default="")   # how backward computes the gradients

    @property
    def num_steps(self) -> int:
        return len(self.step_sizes)


class TransformerVectorField(nn.Module):
    """``f(t, z) = Attn(z + t e) + FFN(z + t e)``: a parallel attention + SwiGLU block whose input is
    shifted by a learned time direction ``e`` (zero at start). ``z``: ``[B, S, D]`` -> ``[B, S, D]``.

    Example::

        f = TransformerVectorField(d_model=64, num_heads=2, d_ff=128)
        dz = f(0.5, torch.randn(2, 7, 64))          # [2, 7, 64]
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, causal: bool = True):
        super().__init__()
        self.time = nn.Parameter(torch.zeros(d_model))
        self.attn = SelfAttention(d_model, num_heads, causal=causal)
        self.ffn = FeedForward(d_model, d_ff)

    def forward(self, t: float, z: Tensor) -> Tensor:
        x = z + t * self.time.to(z.dtype)
        return self.attn(x) + self.ffn(x)


class _Counted:
    """``f`` that counts its calls (the NFE of a solve)."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def __call__(self, t, z):
        self.n += 1
        return self.f(t, z)


def solve(solver: ReversibleSolver, f, z0: Tensor, t1: float, num_steps: int, tolerance: float | None = None,
          max_depth: int = 100, steps: list[float] | None = None):
    """Integrate ``z0`` from 0 to ``t1``: replay ``steps``, or ``num_steps`` equal steps, or adaptive
    steps when ``tolerance`` is given. Returns ``(final state, accepted step sizes)``. Runs under
    whatever grad mode the caller set: under grad it is the unrolled solver (the reference)."""
    state, t = solver.init(f, 0.0, z0), 0.0
    if steps is None and tolerance is None:
        steps = [t1 / num_steps] * num_steps
    if steps is not None:
        for h in steps:
            state, t = solver.step(f, t, h, state), t + h
        return state, list(steps)
    h, accepted, tries = t1 / num_steps, [], 0
    while t1 - t > 1e-12 * t1:
        h, tries = min(h, t1 - t), tries + 1
        new = solver.step(f, t, h, state)
        ratio = error_ratio(solver.local_error(state, new, h), solver.output(state), solver.output(new), tolerance)
        check_ratio(ratio, t, h)
        if ratio <= 1:
            state, t = new, t + h
            accepted.append(h)
            if len(accepted) > max_depth:
                raise ValueError(f"{type(solver).__name__} needed more than max_depth={max_depth} steps to reach "
                                 f"t1={t1} at tolerance={tolerance} (reached t={t:.4g}); raise max_depth or tolerance")
        h = next_step(h, ratio)
    return state, accepted


def _autocast_state(device_type: str) -> tuple:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast(state: tuple):
    return torch.autocast(device_type=state[0], dtype=state[2], enabled=state[1])


def _aliased(module: nn.Module):
    """``(f, aliases)``: ``f(t, z)`` runs ``module`` with its parameters replaced by detached leaves that
    share their storage, so gradients can be taken without touching the parameters' hooks or ``.grad``."""
    aliases = {n: p.detach().requires_grad_(p.requires_grad)
               for n, p in module.named_parameters()}
    return (lambda t, z: functional_call(module, aliases, (t, z))), aliases


def _param_grads(module: nn.Module, grads: dict) -> list[Tensor | None]:
    return [grads.get(n) for n, _ in module.named_parameters()]


def _add(grads: dict, names: list[str], gs) -> None:
    for n, g in zip(names, gs):
        if g is not None:
            grads[n] = g if n not in grads else grads[n] + g


class _ReversibleSolve(torch.autograd.Function):
    """Forward: the solve without grad, keeping the final state only. Backward: unstep, re-step with
    grad, pull the gradient through, from the last step to the first, then through ``init``."""

    @staticmethod
    def forward(ctx, solver, module, opts, record, z0, *params):
        counted = _Counted(module)
        with torch.no_grad():
            state, steps = solve(solver, counted, z0, **opts)
        record.update(steps=steps, nfe=counted.n)
        ctx.solver, ctx.module, ctx.steps = solver, module, steps
        ctx.autocast = _autocast_state(z0.device.type)
        ctx.save_for_backward(*state)
        return solver.output(state)

    @staticmethod
    @once_differentiable
    def backward(ctx, dz):
        with _autocast(ctx.autocast):   # re-run the steps under the forward's autocast state
            return _ReversibleSolve._backward(ctx, dz)

    @staticmethod
    def _backward(ctx, dz):
        solver, module = ctx.solver, ctx.module
        state = ctx.saved_tensors
        f, aliases = _aliased(module)
        names = [n for n, a in aliases.items() if a.requires_grad]
        leaves_p = [aliases[n] for n in names]
        d = [dz] + [torch.zeros_like(s) for s in state[1:]]
        grads: dict[str, Tensor] = {}
        times = [0.0]
        for h in ctx.steps[:-1]:
            times.append(times[-1] + h)
        for t, h in zip(reversed(times), reversed(ctx.steps)):
            with torch.no_grad():
                prev = solver.unstep(module, t, h, state)
            with torch.enable_grad():
                leaves = [s.detach().requires_grad_() for s in prev]
                new = solver.step(f, t, h, tuple(leaves))
                gs = torch.autograd.grad(new, leaves + leaves_p, d, allow_unused=True)
            d = [g if g is not None else torch.zeros_like(s) for g, s in zip(gs[:len(leaves)], prev)]
            _add(grads, names, gs[len(leaves):])
            state = prev
        with torch.enable_grad():
            z0 = solver.output(state).detach().requires_grad_()
            gs = torch.autograd.grad(solver.init(f, 0.0, z0), [z0] + leaves_p, d, allow_unused=True)
        _add(grads, names, gs[1:])
        return (None, None, None, None, gs[0], *_param_grads(module, grads))


class _AdjointSolve(torch.autograd.Function):
    """dopri5 forward without grad; backward integrates the adjoint system ``(z, a, g_theta)`` from t1
    back to 0 with dopri5: an approximation of the solver's gradient (error set by the tolerance)."""

    @staticmethod
    def forward(ctx, module, opts, record, z0, *params):
        counted = _Counted(module)
        with torch.no_grad():
            (z1,), steps = dopri5_solve(lambda t, y: (counted(t, y[0]),), (z0,), 0.0, opts["t1"],
                                        opts["tolerance"], opts["max_depth"], opts["t1"] / opts["num_steps"])
        record.update(steps=steps, nfe=counted.n)
        ctx.module, ctx.opts, ctx.autocast = module, opts, _autocast_state(z0.device.type)
        ctx.save_for_backward(z1)
        return z1

    @staticmethod
    @once_differentiable
    def backward(ctx, dz1):
        with _autocast(ctx.autocast):
            return _AdjointSolve._backward(ctx, dz1)

    @staticmethod
    def _backward(ctx, dz1):
        (z1,), module, opts = ctx.saved_tensors, ctx.module, ctx.opts
        f, aliases = _aliased(module)
        names = [n for n, a in aliases.items() if a.requires_grad]
        leaves_p = [aliases[n] for n in names]

        def augmented(t, y):
            with torch.enable_grad():
                z = y[0].detach().requires_grad_()
                fz = f(t, z)
                gs = torch.autograd.grad(fz, [z] + leaves_p, y[1], allow_unused=True)
            gs = [torch.zeros_like(x) if g is None else g for g, x in zip(gs, [z] + leaves_p)]
            return (fz.detach(), *(-g for g in gs))

        y1 = (z1, dz1, *(torch.zeros_like(p) for p in leaves_p))
        y0, _ = dopri5_solve(augmented, y1, opts["t1"], 0.0, opts["tolerance"], 10 * opts["max_depth"])
        grads = dict(zip(names, y0[2:]))
        return (None, None, None, y0[1], *_param_grads(module, grads))


class ContinuousDepthRevNet(nn.Module):
    """A continuous-depth transformer: ``z(t1)`` of ``dz/dt = f(t, z)``, ``z(0) = x``, with a reversible
    integrator whose training memory is that of one state, whatever the number of steps.

    ``ContinuousDepthRevNet(config=None, vector_field=None, **overrides)``: a ``ContinuousDepthConfig`` or
    its fields as keywords; ``vector_field`` any module ``f(t, z [B, S, D]) -> [B, S, D]`` (default:
    ``TransformerVectorField``). ``forward(x [B, S, D], tolerance=None, max_depth=None, num_steps=None)``
    returns a ``ContinuousDepthOutput``; the keywords override the config for this call (``tolerance``
    and ``max_depth`` apply to adaptive solves only).

    Gradients: exact (equal to backpropagation through the unrolled solver) for 'leapfrog' / 'mali',
    'reversible_heun' and 'momentum'. For 'dopri5' they come from the continuous adjoint and are
    APPROXIMATE; the output's ``exact_gradients`` is then False.

    Example::

        net = ContinuousDepthRevNet(d_model=64, ode_solver="reversible_heun", depth_function="adaptive")
        out = net(torch.randn(2, 16, 64), tolerance=1e-3, max_depth=50)
        out.hidden.square().mean().backward()        # memory of one state, not of out.num_steps
    """

    def __init__(self, config: ContinuousDepthConfig | None = None, vector_field: nn.Module | None = None,
                 **overrides):
        super().__init__()
        if config is not None and overrides:
            raise TypeError(f"pass a config or keyword fields, not both (got {sorted(overrides)})")
        self.config = c = config if config is not None else ContinuousDepthConfig(**overrides)
        if not isinstance(c, ContinuousDepthConfig):
            raise TypeError(f"config must be a ContinuousDepthConfig, got {type(c).__name__}")
        self.field = vector_field if vector_field is not None else TransformerVectorField(
            c.d_model, c.num_heads, c.d_ff, c.causal)
        kind = SOLVERS.get(c.ode_solver)
        self.solver = None if kind is None else kind(c.momentum) if c.ode_solver == "momentum" else kind()

    def forward(self, x: Tensor, tolerance: float | None = None, max_depth: int | None = None,
                num_steps: int | None = None) -> ContinuousDepthOutput:
        c = self.config
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != c.d_model or not x.is_floating_point():
            raise ValueError(f"x must be a floating tensor [B, S, d_model={c.d_model}], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if c.depth_function == "fixed" and (tolerance is not None or max_depth is not None):
            raise ValueError(f"tolerance={tolerance} / max_depth={max_depth} apply to adaptive solves; this "
                             "model has depth_function='fixed' (pass num_steps instead)")
        opts = {"t1": c.t1, "num_steps": num_steps or c.num_steps,
                "tolerance": (tolerance or c.tolerance) if c.depth_function == "adaptive" else None,
                "max_depth": max_depth or c.max_depth}
        ContinuousDepthConfig(**{**c.__dict__, "num_steps": opts["num_steps"], "max_depth": opts["max_depth"],
                                 "tolerance": opts["tolerance"] or c.tolerance})   # validates the overrides
        if torch.is_grad_enabled() and any(isinstance(m, nn.Dropout) and m.p > 0 and m.training
                                           for m in self.field.modules()):
            raise ValueError("the vector field applies dropout: backward re-evaluates it and would draw other "
                             "masks, so the gradients would be wrong; use p=0 or model.eval()")
        params = list(self.field.parameters())
        record: dict = {}
        if self.solver is None:
            hidden = _AdjointSolve.apply(self.field, opts, record, x, *params)
            method = "continuous adjoint, dopri5 both ways (approximate)"
        else:
            hidden = _ReversibleSolve.apply(self.solver, self.field, opts, record, x, *params)
            method = f"{self.solver.name}: reversible replay of the accepted steps (exact)"
        return ContinuousDepthOutput(hidden, record["steps"], record["nfe"], self.solver is not None, method)


__all__ = ["ContinuousDepthConfig", "ContinuousDepthOutput", "ContinuousDepthRevNet", "TransformerVectorField",
           "solve"]
