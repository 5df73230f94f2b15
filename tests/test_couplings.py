"""Couplings: invertibility (property tests), bad input, the gradient checker."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import MLP, coupling

from revnet_zero import AdditiveCoupling, AffineCoupling, CouplingType, ReversibleBlock, ReversibleSequence
from revnet_zero.layers import make_coupling
from revnet_zero.utils import ReversibleGradientChecker, is_invertible


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["additive", "affine", "custom"]), b=st.integers(1, 3), s=st.integers(1, 9),
       d=st.integers(2, 21), depth=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_inverse_of_forward_is_identity(kind, b, s, d, depth, seed):
    torch.manual_seed(seed)
    seq = ReversibleSequence([coupling(kind, d, hidden=7) for _ in range(depth)], stream_dtype=None).double()
    x1, x2 = torch.randn(b, s, d, dtype=torch.float64), torch.randn(b, s, d, dtype=torch.float64)
    with torch.no_grad():
        r1, r2 = seq.inverse(*seq(x1, x2))
    # float64 rebuild: a few ulps of |y| per block
    torch.testing.assert_close(r1, x1, rtol=0, atol=1e-12)
    torch.testing.assert_close(r2, x2, rtol=0, atol=1e-12)


def test_affine_scale_is_bounded_away_from_zero():
    c = AffineCoupling(f=MLP(4, mult=2), scale_init=0.1)
    x, h = torch.randn(3, 4), torch.cat([torch.full((3, 4), 1e6), torch.zeros(3, 4)], -1)
    s, _, _ = c._scale_shift(x, h)
    assert torch.all(s >= torch.exp(torch.tensor(-0.1)) - 1e-6) and torch.all(s <= torch.exp(torch.tensor(0.1)) + 1e-6)


def test_coupling_type_and_binding():
    c = make_coupling(CouplingType.ADDITIVE, f=MLP(4))
    assert isinstance(c, AdditiveCoupling) and c.g is None
    rule = AffineCoupling(split_dim=-1, scale_init=0.1)
    bound = make_coupling(rule, g=MLP(4, mult=2))
    assert bound is rule and bound.g is not None
    with pytest.raises(ValueError, match="already has g"):
        make_coupling(rule, g=MLP(4, mult=2))
    with pytest.raises(ValueError, match="unknown coupling 'sideways'"):
        make_coupling("sideways")


def test_bad_input_errors_name_the_problem():
    block = ReversibleBlock(coupling("additive", 8))
    with pytest.raises(ValueError, match=r"same shape, got x1 \(2, 3, 8\) and x2 \(2, 4, 8\)"):
        block(torch.randn(2, 3, 8), torch.randn(2, 4, 8))
    with pytest.raises(TypeError, match="floating point, got x1.dtype=torch.int64"):
        block(torch.ones(2, 3, 8, dtype=torch.long), torch.ones(2, 3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="must be a Tensor, got list"):
        block([1.0], torch.randn(1))
    with pytest.raises(ValueError, match="running statistics"):
        ReversibleBlock(AdditiveCoupling(f=nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(3))))
    with pytest.raises(TypeError, match="needs a BaseCoupling, got Linear"):
        ReversibleBlock(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="neither f nor g"):
        ReversibleBlock(AdditiveCoupling())
    with pytest.raises(ValueError, match="policy must be one of"):
        block.policy = "sometimes"
    with pytest.raises(ValueError, match="function output shape \\(2, 3, 5\\) differs"):
        ReversibleBlock(AdditiveCoupling(f=nn.Linear(8, 5)))(torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="cannot split an odd width 7"):
        AffineCoupling(f=nn.Linear(8, 7))(torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="twice the stream width"):
        AffineCoupling(f=nn.Linear(8, 8))(torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="scale_init must be a finite number"):
        AffineCoupling(scale_init=0.0)
    with pytest.raises(ValueError, match="requires grad"):
        block(torch.randn(2, 3, 8), torch.randn(2, 3, 8), mask=torch.randn(3, requires_grad=True))


def test_gradient_checker_and_is_invertible():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12),
                          ReversibleSequence([coupling(k, 12) for k in ("additive", "affine", "custom")]))
    checker = ReversibleGradientChecker()
    result = checker.check_model(model, input_shape=(2, 5, 12), tolerance=1e-6)
    assert result == {"1.blocks.0": True, "1.blocks.1": True, "1.blocks.2": True}
    assert max(checker.errors.values()) < 1e-12  # float64 copies: the engine is exact to rounding
    x = torch.randn(2, 5, 12)
    assert all(is_invertible(b, x) for b in model[1].blocks)


def test_gradient_checker_catches_a_wrong_backward():
    class Broken(AdditiveCoupling):  # a rule whose vjp forgets the gradient through h
        def combine_vjp(self, x, h, dy):
            return dy, torch.zeros_like(dy)

    block = ReversibleBlock(Broken(f=MLP(6), g=MLP(6)))
    checker = ReversibleGradientChecker()
    assert checker.check_model(block, input_shape=(1, 3, 6)) == {"": False}
    assert checker.errors[""] > 0.1
    with pytest.raises(ValueError, match="no ReversibleBlock"):
        checker.check_model(nn.Linear(2, 2), input_shape=(1, 2))
