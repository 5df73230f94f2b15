"""fused_linear_cross_entropy against the plain reference F.cross_entropy(hidden @ weight.T).

Tolerances (relative error of the whole tensor, ||a - b|| / ||b||):
- float32: 1e-6. Both sides compute the same sums in a different order (per-chunk partial sums of the
  loss, per-chunk GEMMs for the weight gradient): a few float32 roundings (6e-8 each) apart. A loss
  that is a near-cancellation (logsumexp - picked logit, confident rows) is held to 1e-6 of its terms.
- float64: 1e-12. Both sides are float64 throughout (the loss accumulates in float64 for float64
  inputs), so they differ by summation order only: a few float64 roundings (1.1e-16 each) of terms
  of order 1. Accumulating in float32, as for float32 inputs, would be 1e-7 off and fail.
- bf16 autocast: 1e-5 on the loss, 1e-2 on the gradients (measured: 6e-8; 2e-6 for dh, 2.4e-3 for dW).
  The logits are the same bf16 GEMM on both sides and the softmax is float32 on both; the gradients
  go through bf16 GEMMs whose inputs (softmax - onehot) are rounded to bf16 (relative step 2^-8 =
  4e-3) and whose outputs are rounded once per chunk here instead of once overall.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from revnet_zero.ops import fused_linear_cross_entropy




def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def make(n=37, d=24, v=50, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=dtype) / math.sqrt(d)).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    return h, w, t


def reference(h, w, t, reduction="mean"):
    hr, wr = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = F.cross_entropy((hr @ wr.t()).float(), t, ignore_index=-100, reduction=reduction)
    loss.backward()
    return loss.detach(), hr.grad, wr.grad


def fused(h, w, t, chunk, reduction="mean"):
    hf, wf = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fused_linear_cross_entropy(hf, wf, t, chunk_size=chunk, reduction=reduction)
    loss.backward()
    return loss.detach(), hf.grad, wf.grad


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fp32_loss_and_both_grads_match_reference(chunk, reduction):
    h, w, t = make()
    t[3] = t[20] = -100
    t[8:16] = -100                      # chunk 8..15 wholly ignored when chunk == 8
    for a, b in zip(fused(h, w, t, chunk, reduction), reference(h, w, t, reduction)):
        assert rel(a, b) <= 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float64_stays_float64(reduction):
    h, w, t = make(n=53, d=16, v=40, dtype=torch.float64)
    t[5] = -100
    hr, wr = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref_loss = F.cross_entropy(hr @ wr.t(), t, ignore_index=-100, reduction=reduction)  # float64 throughout
    ref_loss.backward()
    out = fused(h, w, t, 8, reduction)
    assert [x.dtype for x in out] == [torch.float64] * 3
    for a, b in zip(out, (ref_loss.detach(), hr.grad, wr.grad)):
        assert rel(a, b) <= 1e-12


def test_all_ignored_gives_nan_loss_and_zero_grads_like_torch():
    h, w, t = make(n=9)
    t[:] = -100
    loss, dh, dw = fused(h, w, t, 4)
    ref_loss, ref_dh, ref_dw = reference(h, w, t)
    assert torch.isnan(loss) and torch.isnan(ref_loss)
    assert torch.equal(dh, ref_dh) and torch.equal(dw, ref_dw) and not dh.any()


def test_bf16_autocast_matches_reference_within_bf16_tolerance():
    h, w, t = make(n=301, d=64, v=1000)
    t[50:90] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(h, w, t, 64)
        ref = reference(h, w, t)
    assert rel(out[0], ref[0]) <= 1e-5
    assert rel(out[1], ref[1]) <= 1e-2 and rel(out[2], ref[2]) <= 1e-2
    assert out[1].dtype == torch.float32 and out[2].dtype == torch.float32


def test_upstream_gradient_scales_the_stored_gradients():
    h, w, t = make()
    hf, wf = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (3.0 * fused_linear_cross_entropy(hf, wf, t, chunk_size=5)).backward()
    _, dh, dw = reference(h, w, t)
    assert rel(hf.grad, 3 * dh) <= 1e-6 and rel(wf.grad, 3 * dw) <= 1e-6


def test_grad_for_one_input_only_and_no_grad_forward():
    h, w, t = make()
    ref_loss, ref_dh, ref_dw = reference(h, w, t)
    hf = h.detach().clone().requires_grad_()
    fused_linear_cross_entropy(hf, w.detach(), t, chunk_size=6).backward()
    assert rel(hf.grad, ref_dh) <= 1e-6
    wf = w.detach().clone().requires_grad_()
    fused_linear_cross_entropy(h.detach(), wf, t, chunk_size=6).backward()
    assert rel(wf.grad, ref_dw) <= 1e-6
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, t, chunk_size=6)
    assert loss.grad_fn is None and rel(loss, ref_loss) <= 1e-6


def test_second_backward_through_one_call_raises():
    h, w, t = make()
    loss = fused_linear_cross_entropy(h, w, t, chunk_size=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_bad_inputs_raise_with_values():
    h, w, t = make()
    t[4], t[7] = 50, -3
    with pytest.raises(ValueError, match=r"\[0, 50\).*from -3 to 50"):
        fused_linear_cross_entropy(h, w, t)
    with pytest.raises(ValueError, match=r"\(37, 24\).*\(50, 23\)"):
        fused_linear_cross_entropy(h, w[:, :23], make()[2])
    with pytest.raises(ValueError, match=r"\[N\] = \[37\]"):
        fused_linear_cross_entropy(h, w, make()[2][:5])
    with pytest.raises(ValueError, match="2,147,483,700"):
        fused_linear_cross_entropy(h, w, make()[2], chunk_size=42949674)   # 42949674 * 50 > 2^31
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, make()[2], reduction="none")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), v=st.integers(2, 30), chunk=st.integers(1, 45), seed=st.integers(0, 10**6))
def test_property_any_shape_and_chunking_matches_reference(n, v, chunk, seed):
    h, w, t = make(n=n, d=7, v=v, seed=seed)
    t[torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.3] = -100
    if (t == -100).all():
        t[0] = 0
    (loss, *grads), (ref_loss, *ref_grads) = fused(h, w, t, chunk), reference(h, w, t)
    # A confident row cancels: its loss is logsumexp - picked logit and its gradient softmax - onehot,
    # both small differences of O(1) terms. Both sides are then a few float32 ulps of those terms apart,
    # which is large relative to the small result (found by hypothesis: n=1, v=2, loss 0.0128, rel 5e-6).
    # So each result is held to 1e-6 of the magnitude of the terms it is summed from.
    keep = t != -100
    hd, wd = h.detach().double(), w.detach().double()
    logits = hd @ wd.t()
    g = (torch.softmax(logits, -1) + F.one_hot(t.clamp(min=0), w.shape[0])) * keep[:, None] / keep.sum()
    loss_scale = (torch.logsumexp(logits, -1).abs() + logits.gather(1, t.clamp(min=0)[:, None])[:, 0].abs())
    loss_scale = loss_scale[keep].mean()
    assert abs(loss.double() - ref_loss.double()) <= 1e-6 * loss_scale
    for a, b, scale in zip(grads, ref_grads, (g @ wd.abs(), g.t() @ hd.abs())):
        assert (a.double() - b.double()).norm() <= 1e-6 * scale.norm()
