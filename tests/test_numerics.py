"""Reconstruction drift: measured by ``ReversibleSequence(check_drift=...)`` and warned about.

An additive stack whose inputs are tiny next to what its sub-functions add rebuilds them by
subtracting nearly equal float32 numbers: inputs of scale 1e-6 under sub-function outputs of
scale 1 (LayerNorm first, so the outputs do not shrink with the input) come back with a
relative error of about 2^-24 / 1e-6 ~ 6e-2 per rebuild, growing down the stack. Inputs of scale
1 come back to float32 rounding (~1e-7). The bound 1e-3 lies far from both.
"""
import warnings

import pytest
import torch
from helpers import coupling, rel_err

from revnet_zero import ReversibleSequence
from revnet_zero.plain_reference import reference_forward


def _step(stack, x):
    y1, y2 = stack(x)
    (y1 * y2).sum().backward()


def _grads(run, stack, x, w):
    x = x.detach().requires_grad_()
    y1, y2 = run(x)
    return torch.autograd.grad((y1 * w[0]).sum() + (y2 * w[1]).sum(), [x, *stack.parameters()])


def test_tiny_inputs_warn_and_report_the_drift():
    torch.manual_seed(0)
    stack = ReversibleSequence([coupling("additive", 16) for _ in range(8)], check_drift=1e-3)
    x = 1e-6 * torch.randn(2, 40, 16)
    w = torch.randn(2, 40, 16), torch.randn(2, 40, 16)
    with pytest.warns(RuntimeWarning, match="check_drift=0.001"):
        got = _grads(stack, stack, x, w)
    assert stack.last_drift > 1e-3
    # what the warning is about: the gradients are far from plain autograd's (0.7 measured)
    want = _grads(lambda t: reference_forward(stack, t), stack, x, w)
    assert max(rel_err(a, b) for a, b in zip(got, want)) > 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once per module
        _step(stack, x.requires_grad_())


def test_normal_inputs_do_not_warn():
    torch.manual_seed(0)
    stack = ReversibleSequence([coupling("additive", 16) for _ in range(8)], check_drift=1e-3)
    stack.set_policy("store", layers=[3])   # two runs: both are measured
    x = torch.randn(2, 40, 16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(stack, x)
    assert 0 <= stack.last_drift <= 1e-5


def test_drift_is_off_by_default_and_validated():
    stack = ReversibleSequence([coupling("additive", 8) for _ in range(2)])
    _step(stack, 1e-6 * torch.randn(2, 4, 8, requires_grad=True))
    assert stack.last_drift is None
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1e-3"):
        with pytest.raises(ValueError, match="check_drift"):
            ReversibleSequence([coupling("additive", 8)], check_drift=bad)
        with pytest.raises(ValueError, match="check_drift"):
            stack.check_drift = bad
