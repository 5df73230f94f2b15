"""Rotation and orthogonal couplings: exact inverses, gradients against plain autograd, the model option."""
import math

import pytest
import torch
from helpers import MLP, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from revnet_zero import (
    AdditiveCoupling,
    ReversibleBlock,
    ReversibleSequence,
    TransformerConfig,
)
from revnet_zero.layers import OrthogonalMixCoupling, OrthogonalMixing, RotationCoupling
from revnet_zero.models import ReversibleTransformer
from revnet_zero.utils import gradient_error, is_invertible

F64 = torch.float64


def make(kind: str, d: int, hidden: int = 7):
    if kind == "rotation":
        return RotationCoupling(MLP(d, hidden, mult=2), MLP(d, hidden, mult=2))
    if kind == "mixing_learned":
        return OrthogonalMixing(d, angle=torch.randn(d))
    if kind == "mixing_fixed":
        return OrthogonalMixing(d, angle=math.pi / 4, learned=False)
    return OrthogonalMixCoupling(AdditiveCoupling(MLP(d, hidden), MLP(d, hidden)), d, angle=0.3)


KINDS = ["rotation", "mixing_learned", "mixing_fixed", "mix_coupling"]


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(KINDS), b=st.integers(1, 3), s=st.integers(1, 7), half=st.integers(1, 9),
       depth=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_inverse_of_forward_is_identity(kind, b, s, half, depth, seed):
    torch.manual_seed(seed)
    d = 2 * half   # rotations pair channels: even widths, including 2 and non-powers of two
    seq = ReversibleSequence([make(kind, d) for _ in range(depth)], stream_dtype=None).to(F64)
    x1, x2 = torch.randn(b, s, d, dtype=F64), torch.randn(b, s, d, dtype=F64)
    with torch.no_grad():
        r1, r2 = seq.inverse(*seq(x1, x2))
    # float64: a few ulps of |y| per block and rotation
    torch.testing.assert_close(r1, x1, rtol=0, atol=1e-12)
    torch.testing.assert_close(r2, x2, rtol=0, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(half=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_rotation_preserves_the_norm_of_the_rotated_stream(half, seed):
    """R is orthogonal: |y - t(u)| = |x| for any angles (volume preserving, det = +-1)."""
    torch.manual_seed(seed)
    d = 2 * half
    c = RotationCoupling()
    x, h = torch.randn(3, d, dtype=F64), 10 * torch.randn(3, 2 * d, dtype=F64)
    y = c.combine(x, h)
    torch.testing.assert_close((y - h[:, d:]).norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=0)
    jac = torch.autograd.functional.jacobian(lambda v: c.combine(v, h[0]), x[0])
    assert abs(abs(torch.linalg.det(jac).item()) - 1) < 1e-12


def test_combine_vjp_equals_autograd_of_combine():
    torch.manual_seed(0)
    c = RotationCoupling()
    x = torch.randn(2, 5, 10, dtype=F64, requires_grad=True)
    h = torch.randn(2, 5, 20, dtype=F64, requires_grad=True)
    dy = torch.randn(2, 5, 10, dtype=F64)
    want = torch.autograd.grad(c.combine(x, h), [x, h], dy)
    got = c.combine_vjp(x.detach(), h.detach(), dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-13)   # float64, same ops reordered


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    torch.manual_seed(1)
    block = ReversibleBlock(make(kind, 6, hidden=5)).to(F64)
    x1, x2 = (torch.randn(2, 3, 6, dtype=F64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b: block(a, b), (x1, x2))
    # every parameter gradient of the reversible backward equals plain autograd of the same forward
    assert gradient_error(block, x1.detach(), x2.detach()) < 1e-12
    assert is_invertible(block, x1.detach(), x2.detach(), atol=1e-12)


@pytest.mark.parametrize("coupling", ["rotation", "orthogonal"])
def test_transformer_coupling_option_gradients_equal_plain_autograd(coupling):
    torch.manual_seed(0)
    cfg = TransformerConfig.preset("tiny", coupling=coupling, stream_dtype=F64)
    model = ReversibleTransformer(cfg).to(F64)
    if coupling == "orthogonal":   # move the mixing off its identity start so it is exercised
        for b in model.blocks.blocks:
            b.coupling.mix.angle.data.uniform_(-1, 1)
    ids = torch.randint(0, 256, (2, 9))
    grads = {}
    for policy in ("recompute", "store"):
        model.blocks.set_policy(policy)
        loss = model(ids).loss
        grads[policy] = torch.autograd.grad(loss, list(model.parameters()))
    worst = max(rel_err(a, b) for a, b in zip(grads["recompute"], grads["store"]))
    assert worst < 1e-10   # float64: the rebuild adds rounding of ~1e-15 per block


def test_bad_input_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"width must be even, got stream shape \(2, 3, 5\)"):
        RotationCoupling(f=torch.nn.Linear(5, 10))(torch.randn(2, 3, 5), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"twice the stream width .* function output shape \(2, 3, 6\)"):
        RotationCoupling(f=torch.nn.Linear(6, 6))(torch.randn(2, 3, 6), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=r"has 4 channels, got streams of shape \(2, 6\)"):
        OrthogonalMixing(4)(torch.randn(2, 6), torch.randn(2, 6))
    with pytest.raises(ValueError, match="angle must be finite"):
        OrthogonalMixing(4, angle=float("nan"))
    with pytest.raises(TypeError, match="wraps a StepCoupling, got OrthogonalMixing"):
        OrthogonalMixCoupling(OrthogonalMixing(4), 4)
    with pytest.raises(ValueError, match="coupling must be one of .*'rotation', 'orthogonal'"):
        TransformerConfig.preset("tiny", coupling="quantum")
