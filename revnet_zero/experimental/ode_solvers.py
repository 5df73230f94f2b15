"""Algebraically reversible ODE integrators for ``dz/dt = f(t, z)``, and a Dormand-Prince stepper.

A reversible integrator's step maps a state (a tuple of tensors) forward, and ``unstep`` recovers the
state before it from the state after it *in closed form*, with one evaluation of ``f``. Backward can
therefore rebuild every intermediate state from the final one and keep nothing per step. The rebuilt
state equals the forward one up to float rounding (a few ulps per step in float64).

* ``AsyncLeapfrog`` — MALI's asynchronous leapfrog (Zhuang et al. 2021): state ``(z, v)``.
* ``ReversibleHeun`` — Kidger et al. 2021: state ``(y, z, f(t, z))``; second order.
* ``MomentumResidual`` — momentum residual networks (Sander et al. 2021) with a step ``h``: state
  ``(x, v)``, ``v' = gamma v + (1 - gamma) f(t, x)``, ``x' = x + h v'``. Its inverse divides by
  ``gamma``, which amplifies rounding by ``1 / gamma`` per step: exact in float64, drifts in float32
  over many steps (MomentumNets keep the lost bits; we do not).

Each solver also gives a local error estimate for adaptive stepping: the gap between its update and
an Euler update with the old slope, ``(h / 2) |slope_new - slope_old|`` (order 2).
"""
from __future__ import annotations

import abc

from collections.abc import Callable

import torch
from torch import Tensor

Field = Callable[[float, Tensor], Tensor]   # f(t, z [B, S, D]) -> dz/dt [B, S, D]
State = tuple[Tensor, ...]


class ReversibleSolver(abc.ABC):
    """A reversible one-step method. ``init`` builds the state from ``z0``; ``step`` / ``unstep`` are
    exact inverses of each other (up to rounding); ``output`` is the solution ``z`` in the state."""

    name = ""

    @abc.abstractmethod
    def init(self, f: Field, t: float, z: Tensor) -> State:
        ...

    @abc.abstractmethod
    def step(self, f: Field, t: float, h: float, s: State) -> State:
        ...

    @abc.abstractmethod
    def unstep(self, f: Field, t: float, h: float, s: State) -> State:
        """The state at ``t`` from the state at ``t + h``."""
        ...

    def output(self, s: State) -> Tensor:
        return s[0]

    @abc.abstractmethod
    def local_error(self, old: State, new: State, h: float) -> Tensor:
        ...


class AsyncLeapfrog(ReversibleSolver):
    """``z_half = z + v h/2``, ``v' = 2 f(t + h/2, z_half) - v``, ``z' = z_half + v' h/2``; ``v0 = f(t0, z0)``.

    Example::

        s = AsyncLeapfrog()
        state = s.init(f, 0.0, z0)
        state = s.step(f, 0.0, 0.1, state)
        back = s.unstep(f, 0.0, 0.1, state)      # == (z0, f(0, z0)) up to rounding
    """

    name = "leapfrog"

    def init(self, f, t, z):
        return z, f(t, z)

    def step(self, f, t, h, s):
        z, v = s
        mid = z + v * (h / 2)
        v_new = 2 * f(t + h / 2, mid) - v
        return mid + v_new * (h / 2), v_new

    def unstep(self, f, t, h, s):
        z, v = s
        mid = z - v * (h / 2)
        v_old = 2 * f(t + h / 2, mid) - v
        return mid - v_old * (h / 2), v_old

    def local_error(self, old, new, h):
        return (new[1] - old[1]) * (h / 2)


class ReversibleHeun(ReversibleSolver):
    """``z' = 2y - z + f(t, z) h``, ``y' = y + (f(t, z) + f(t + h, z')) h / 2``; ``z0 = y0``. The state
    carries ``f(t, z)`` so each step (and each unstep) evaluates ``f`` once.

    Example::

        s = ReversibleHeun()
        state = s.step(f, 0.0, 0.1, s.init(f, 0.0, z0))
        y1 = s.output(state)
    """

    name = "reversible_heun"

    def init(self, f, t, z):
        return z, z, f(t, z)

    def step(self, f, t, h, s):
        y, z, fz = s
        z_new = 2 * y - z + fz * h
        f_new = f(t + h, z_new)
        return y + (fz + f_new) * (h / 2), z_new, f_new

    def unstep(self, f, t, h, s):
        y, z, fz = s
        z_old = 2 * y - z - fz * h
        f_old = f(t, z_old)
        return y - (f_old + fz) * (h / 2), z_old, f_old

    def local_error(self, old, new, h):
        return (new[2] - old[2]) * (h / 2)


class MomentumResidual(ReversibleSolver):
    """``v' = gamma v + (1 - gamma) f(t, x)``, ``x' = x + h v'``; ``v0 = f(t0, x0)``.

    Example::

        s = MomentumResidual(gamma=0.9)
        state = s.step(f, 0.0, 0.1, s.init(f, 0.0, z0))
    """

    name = "momentum"

    def __init__(self, gamma: float = 0.9):
        if not (isinstance(gamma, (int, float)) and 0 < gamma < 1):
            raise ValueError(f"gamma must lie in (0, 1) (its inverse divides by gamma), got {gamma!r}")
        self.gamma = float(gamma)

    def init(self, f, t, z):
        return z, f(t, z)

    def step(self, f, t, h, s):
        x, v = s
        v_new = self.gamma * v + (1 - self.gamma) * f(t, x)
        return x + v_new * h, v_new

    def unstep(self, f, t, h, s):
        x, v = s
        x_old = x - v * h
        return x_old, (v - (1 - self.gamma) * f(t, x_old)) / self.gamma

    def local_error(self, old, new, h):
        return (new[1] - old[1]) * (h / 2)


SOLVERS = {"leapfrog": AsyncLeapfrog, "mali": AsyncLeapfrog, "reversible_heun": ReversibleHeun,
           "momentum": MomentumResidual}


def error_ratio(err: Tensor, old: Tensor, new: Tensor, tolerance: float) -> float:
    """RMS of ``err / (tolerance * (1 + max(|old|, |new|)))``: <= 1 means the step is accepted."""
    scale = tolerance * (1 + torch.maximum(old.abs(), new.abs()))
    return float((err.detach().float() / scale.detach().float()).pow(2).mean().sqrt())


def check_ratio(ratio: float, t: float, h: float) -> None:
    """A non-finite error (the state overflowed or became NaN) would shrink the step forever."""
    if not ratio == ratio or ratio == float("inf"):
        raise ValueError(f"the local error estimate is {ratio} at t={t:.4g} with step {h:.3g}: the state "
                         "is not finite")


def next_step(h: float, ratio: float, order: int = 2) -> float:
    """The step size after one with this error ratio (the usual safety factor 0.9, change within 0.2-5x)."""
    factor = 5.0 if ratio == 0 else 0.9 * ratio ** (-1.0 / order)
    return h * min(5.0, max(0.2, factor))


# Dormand-Prince 5(4): the nodes, the stages' weights, the 5th-order weights and their gap to the 4th.
DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DP_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def dopri5_step(f: Callable[[float, State], State], t: float, h: float, y: State) -> tuple[State, State]:
    """One Dormand-Prince step of a system over a tuple of tensors: ``(y_new, error_estimate)``."""
    ks: list[State] = []
    for c, row in zip(DP_C, DP_A):
        yi = tuple(y_j + h * sum(a * k[j] for a, k in zip(row, ks) if a) if row else y_j
                   for j, y_j in enumerate(y))
        ks.append(f(t + c * h, yi))
    y_new = tuple(y_j + h * sum(b * k[j] for b, k in zip(DP_B, ks) if b) for j, y_j in enumerate(y))
    err = tuple(h * sum(e * k[j] for e, k in zip(DP_E, ks) if e) for j in range(len(y)))
    return y_new, err


def dopri5_solve(f: Callable[[float, State], State], y: State, t0: float, t1: float, tolerance: float,
                 max_steps: int, h0: float | None = None) -> tuple[State, list[float]]:
    """Integrate from ``t0`` to ``t1`` (either direction) with error control on every component;
    returns the state at ``t1`` and the accepted step sizes. ValueError past ``max_steps`` steps."""
    span = t1 - t0
    h, t, accepted = (h0 if h0 is not None else span / 10), t0, []
    while abs(t1 - t) > 1e-12 * max(1.0, abs(span)):
        h = max(h, t1 - t) if span < 0 else min(h, t1 - t)
        y_new, err = dopri5_step(f, t, h, y)
        ratio = max(error_ratio(e, a, b, tolerance) for e, a, b in zip(err, y, y_new))
        check_ratio(ratio, t, h)
        if ratio <= 1:
            y, t = y_new, t + h
            accepted.append(h)
            if len(accepted) > max_steps:
                raise ValueError(f"dopri5 needed more than max_depth={max_steps} steps to reach t={t1} "
                                 f"at tolerance={tolerance} (reached t={t:.4g}); raise max_depth or tolerance")
        h = next_step(h, ratio, order=5)
    return y, accepted
