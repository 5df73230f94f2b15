"""causal_linear_attention (chunked prefix sums) against the naive S x S reference."""
import pytest
import torch

from revnet_zero.ops.linear_attention import (causal_linear_attention, causal_linear_attention_reference,
                                              linear_attention_state)
from helpers import rel_err


def _inputs(S, m=6, dv=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(2, 3, S, m, generator=g).to(dtype).requires_grad_()
    k = torch.rand(2, 3, S, m, generator=g).to(dtype).requires_grad_()
    v = torch.randn(2, 3, S, dv, generator=g).to(dtype).requires_grad_()
    return q, k, v


@pytest.mark.parametrize("S,chunk", [(1, 4), (37, 8), (64, 64), (101, 16), (50, 7)])
def test_matches_reference_fp32(S, chunk):
    # fp32 on both sides, sums of at most S products: only summation order differs (rel ~1e-7)
    q, k, v = _inputs(S)
    out = causal_linear_attention(q, k, v, chunk_size=chunk)
    ref = causal_linear_attention_reference(q, k, v)
    assert out.shape == ref.shape == (2, 3, S, 5)
    assert rel_err(out, ref) <= 1e-5
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for g, r in zip(grads, want):
        assert rel_err(g, r) <= 1e-5


def test_bf16_inputs_computed_in_fp32():
    # bf16 in and out: the only bf16 rounding is the final cast (rel <= 2^-8), the sums are fp32
    q, k, v = _inputs(70, dtype=torch.bfloat16)
    out = causal_linear_attention(q, k, v, chunk_size=16)
    assert out.dtype == torch.bfloat16
    ref = causal_linear_attention_reference(q.float(), k.float(), v.float())
    assert rel_err(out, ref) <= 2 ** -8


def test_causal():
    q, k, v = (t.detach() for t in _inputs(40))
    base = causal_linear_attention(q, k, v, chunk_size=8)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20] += 1.0
    v2[:, :, 20] += 1.0
    out = causal_linear_attention(q, k2, v2, chunk_size=8)
    assert torch.equal(out[:, :, :20], base[:, :, :20])
    assert not torch.allclose(out[:, :, 20:], base[:, :, 20:])


def test_state_is_the_running_sum():
    q, k, v = (t.detach() for t in _inputs(30))
    state = linear_attention_state(k, v)                               # [B, H, m, dv]
    # the last output is q_last . state
    last = q[:, :, -1:] @ state
    assert rel_err(last, causal_linear_attention(q, k, v)[:, :, -1:]) <= 1e-5


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_bad_chunk_size(bad):
    q, k, v = _inputs(8)
    with pytest.raises(ValueError, match=f"chunk_size must be an int >= 1, got {bad!r}"):
        causal_linear_attention(q, k, v, chunk_size=bad)


def test_bad_shapes():
    q, k, v = _inputs(8)
    with pytest.raises(ValueError, match=r"got q \(2, 3, 8, 6\), k \(2, 3, 7, 6\)"):
        causal_linear_attention(q, k[:, :, :7], v)


def test_float32_inside_bf16_autocast():
    # autocast would run the matmuls in bf16 (rel ~1e-2); the op turns it off for its float32 sums
    q, k, v = (t.detach() for t in _inputs(70))
    plain = causal_linear_attention(q, k, v, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = causal_linear_attention(q, k, v, chunk_size=16)
    assert inside.dtype == torch.float32 and rel_err(inside, plain) <= 1e-6
