"""Continuous-depth reversible networks: exact gradients, flat memory, adaptive replay, dopri5 labelled."""
import pytest
import torch
from helpers import rel_err, saved_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

from revnet_zero.experimental import (
    AsyncLeapfrog,
    ContinuousDepthConfig,
    ContinuousDepthRevNet,
    MomentumResidual,
    ReversibleHeun,
)
from revnet_zero.experimental.continuous_depth import solve
from revnet_zero.experimental.ode_solvers import dopri5_solve

F64 = torch.float64
EXACT = ["leapfrog", "reversible_heun", "momentum"]


def net(solver="reversible_heun", depth="fixed", steps=5, **kw):
    torch.manual_seed(0)
    m = ContinuousDepthRevNet(d_model=8, num_heads=2, d_ff=16, ode_solver=solver, depth_function=depth,
                              num_steps=steps, **kw).to(F64)
    with torch.no_grad():
        m.field.time.normal_()   # a time-dependent field, so the time direction's gradient is exercised
    return m


def grads_of(hidden, x, m, w):
    return torch.autograd.grad((hidden * w).sum(), [x, *m.parameters()])


@pytest.mark.parametrize("depth", ["fixed", "adaptive"])
@pytest.mark.parametrize("solver", EXACT)
def test_gradients_equal_backprop_through_the_unrolled_solver(solver, depth):
    m = net(solver, depth, tolerance=1e-4)
    x = torch.randn(2, 5, 8, dtype=F64, requires_grad=True)
    out = m(x)
    w = torch.randn_like(out.hidden)
    got = grads_of(out.hidden, x, m, w)
    # the reference: plain autograd through the same solver, replaying the same accepted steps
    state, _ = solve(m.solver, m.field, x, 1.0, 5, steps=out.step_sizes)
    torch.testing.assert_close(out.hidden, state[0], rtol=0, atol=0)
    want = grads_of(state[0], x, m, w)
    assert out.exact_gradients and "exact" in out.gradient_method
    worst = max(rel_err(g, r) for g, r in zip(got, want))
    assert worst < 1e-8, worst   # float64; the rebuilt states differ from the forward's by rounding only


def test_saved_bytes_do_not_grow_with_the_number_of_steps():
    x = torch.randn(2, 5, 8, dtype=F64, requires_grad=True)
    kept = {}
    for steps in (4, 64):
        m = net("leapfrog", steps=steps)
        kept[steps], _ = saved_bytes(lambda: m(x).hidden)
        ref, _ = saved_bytes(lambda: solve(m.solver, m.field, x, 1.0, steps)[0][0])
        kept[("unrolled", steps)] = ref
    assert kept[4] == kept[64] == 2 * x.numel() * 8   # the final (z, v) only
    assert kept[("unrolled", 64)] > 10 * kept[("unrolled", 4)] / 2   # the unrolled reference does grow


def test_adaptive_steps_follow_the_tolerance_and_replay():
    m = net("reversible_heun", "adaptive", steps=2)
    x = torch.randn(2, 5, 8, dtype=F64)
    loose, tight = m(x, tolerance=1e-2), m(x, tolerance=1e-4)
    assert tight.num_steps > loose.num_steps
    assert abs(sum(tight.step_sizes) - 1.0) < 1e-12 and len(set(tight.step_sizes)) > 1
    assert tight.nfe >= tight.num_steps + 1   # one evaluation per step attempt, plus the initial slope
    with pytest.raises(ValueError, match="more than max_depth=2 steps"):
        m(x, tolerance=1e-8, max_depth=2)


@settings(max_examples=15, deadline=None)
@given(solver=st.sampled_from([AsyncLeapfrog(), ReversibleHeun(), MomentumResidual(0.8)]),
       h=st.floats(-0.5, 0.5).filter(lambda v: abs(v) > 1e-3), t=st.floats(-1, 1), seed=st.integers(0, 999))
def test_unstep_inverts_step(solver, h, t, seed):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(6, 6).to(F64)

    def f(t, z):
        return torch.tanh(lin(z)) * (1 + t)

    s0 = solver.step(f, t - 0.3, 0.3, solver.init(f, t - 0.3, torch.randn(3, 6, dtype=F64)))
    back = solver.unstep(f, t, h, solver.step(f, t, h, s0))
    for a, b in zip(back, s0):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)   # float64, one step: a few ulps


def test_dopri5_runs_with_an_approximate_adjoint_and_says_so():
    m = net("dopri5", "adaptive", steps=4)
    x = torch.randn(2, 5, 8, dtype=F64, requires_grad=True)
    out = m(x, tolerance=1e-6, max_depth=50)
    assert out.exact_gradients is False and "approximate" in out.gradient_method
    assert "APPROXIMATE" in ContinuousDepthRevNet.__doc__
    w = torch.randn_like(out.hidden)
    got = grads_of(out.hidden, x, m, w)
    (z1,), _ = dopri5_solve(lambda t, y: (m.field(t, y[0]),), (x,), 0.0, 1.0, 1e-6, 50, 0.25)
    want = grads_of(z1, x, m, w)
    errs = [rel_err(g, r) for g, r in zip(got, want)]
    # close (the adjoint's own error is set by the tolerance) but, unlike the reversible solvers, not exact
    assert max(errs) < 1e-3 and max(errs) > 1e-12, errs


def test_no_grad_forward_and_bad_input():
    m = net()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 8, dtype=F64)).hidden.shape == (1, 3, 8)
    with pytest.raises(ValueError, match=r"\[B, S, d_model=8\], got \(3, 8\)"):
        m(torch.randn(3, 8, dtype=F64))
    with pytest.raises(ValueError, match="apply to adaptive solves"):
        m(torch.randn(1, 3, 8, dtype=F64), tolerance=1e-3)
    with pytest.raises(ValueError, match="ode_solver must be one of .*'reversible_heun'.*got 'rk4'"):
        ContinuousDepthConfig(d_model=8, ode_solver="rk4")
    with pytest.raises(ValueError, match="use depth_function='adaptive', or a fixed-step exact solver"):
        ContinuousDepthConfig(d_model=8, ode_solver="dopri5")
    with pytest.raises(ValueError, match="momentum must lie in"):
        ContinuousDepthConfig(d_model=8, momentum=1.0)
    with pytest.raises(ValueError, match="gamma must lie in"):
        MomentumResidual(0.0)


def test_backward_runs_under_the_forward_autocast_state():
    """Under bf16 autocast the re-run steps compute in bf16, as the forward did."""
    torch.manual_seed(0)
    m = ContinuousDepthRevNet(d_model=16, num_heads=2, d_ff=32, ode_solver="leapfrog", num_steps=4)
    x = torch.randn(2, 6, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        state, _ = solve(m.solver, m.field, x, 1.0, 4)
    seen = []
    m.field.ffn.w_in.register_forward_hook(lambda mod, args, y: seen.append(y.dtype))
    w = torch.randn_like(out.hidden)
    got = grads_of(out.hidden, x, m, w)          # backward outside autocast: the Function restores it
    assert len(seen) == 2 * 4 + 1 and set(seen) == {torch.bfloat16}   # unstep + re-step per step, init
    want = grads_of(state[0], x, m, w)
    # bf16 sub-functions: a rebuilt state that differs in its last float32 bit can round f(z) to a
    # neighbouring bf16 value (rel 4e-3 each); measured worst 3e-3 here
    assert max(rel_err(g, r) for g, r in zip(got, want)) < 2e-2


def test_dropout_in_the_vector_field_is_refused():
    field = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.1))
    m = ContinuousDepthRevNet(d_model=8, num_heads=2, d_ff=16, vector_field=_TimeFree(field))
    with pytest.raises(ValueError, match="vector field applies dropout"):
        m(torch.randn(1, 3, 8))
    m.eval()
    assert m(torch.randn(1, 3, 8)).hidden.shape == (1, 3, 8)


class _TimeFree(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, z):
        return self.net(z)
