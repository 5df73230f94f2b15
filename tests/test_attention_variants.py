"""Sliding-window, hierarchical and random-feature attention: each against a plain dense reference
(explicit masks / an explicit S x S feature kernel), causality, decoding, config validation.

fp32 tolerances: both sides compute the same sums in float32 in different orders (chunked SDPA vs
one explicit softmax; chunked prefix sums vs one S x S product), rel ~1e-7; 1e-5 leaves room for
summation order, not for a wrong mask, bias or pooled block (those give rel > 1e-2).
"""
import math
import warnings

import pytest
import torch

from helpers import rel_err
from revnet_zero.layers import HierarchicalAttention, RationalFourierAttention, SlidingWindowAttention
from revnet_zero.ops import random_features as rf
from revnet_zero.ops.hierarchical_attention import (HierarchySpec, extended_kv, hierarchical_chunked,
                                                    hierarchical_flex, hierarchical_reference)
from revnet_zero.ops.window_attention import (sliding_window_chunked, sliding_window_flex,
                                              sliding_window_reference)

TOL = 1e-5
SPEC = HierarchySpec(6, (2, 4, 12))     # lengths below are not multiples of 2, 4, 12 or 6


def _qkv(S, H=4, Hkv=2, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, H, S, hd, generator=g).requires_grad_(),
            torch.randn(2, Hkv, S, hd, generator=g).requires_grad_(),
            torch.randn(2, Hkv, S, hd, generator=g).requires_grad_())


def _check_fn(fn, ref, S):
    q, k, v = _qkv(S)
    out, want = fn(q, k, v), ref(q, k, v)
    assert out.shape == want.shape == q.shape
    assert rel_err(out, want) <= TOL
    w = torch.randn_like(want)
    for g, r in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((want * w).sum(), (q, k, v))):
        assert rel_err(g, r) <= TOL


@pytest.mark.parametrize("S,window,chunk", [(1, 4, None), (37, 5, 7), (77, 10, 13), (50, 64, None)])
def test_sliding_window_matches_dense_reference(S, window, chunk):
    _check_fn(lambda q, k, v: sliding_window_chunked(q, k, v, window, chunk_size=chunk),
              lambda q, k, v: sliding_window_reference(q, k, v, window), S)


@pytest.mark.parametrize("S", [1, 5, 37, 77])
def test_hierarchical_matches_dense_reference(S):
    _check_fn(lambda q, k, v: hierarchical_chunked(SPEC, q, k, v, chunk_size=9),
              lambda q, k, v: hierarchical_reference(SPEC, q, k, v), S)


@pytest.mark.parametrize("kernel", rf.KERNELS)
@pytest.mark.parametrize("S", [1, 37, 130])
def test_random_feature_attention_matches_explicit_kernel_matrix(kernel, S):
    w = rf.draw_frequencies(kernel, 16, 8, torch.Generator().manual_seed(1))
    _check_fn(lambda q, k, v: rf.rf_attention(q, k, v, w, kernel, chunk_size=16),
              lambda q, k, v: rf.rf_attention_reference(q, k, v, w, kernel), S)


def test_flex_forward_matches_plain_paths_on_cpu():
    # flex_attention runs its forward (not its backward) on CPU in torch 2.13; the CUDA file tests backward
    q, k, v = (t.detach() for t in _qkv(77))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rel_err(sliding_window_flex(q, k, v, 10), sliding_window_reference(q, k, v, 10)) <= TOL
        assert rel_err(hierarchical_flex(SPEC, q, k, v), hierarchical_reference(SPEC, q, k, v)) <= TOL


@pytest.mark.parametrize("S", [1, 13, 77, 200])
def test_hierarchy_covers_every_past_token_exactly_once(S):
    k = torch.zeros(1, 1, S, 1)
    rows = torch.arange(extended_kv(SPEC, k, k)[0].shape[2])
    pos = torch.arange(S)
    mask, bias = SPEC.allowed(pos[:, None], rows[None, :], S)
    cover = mask[:, :S].long()
    start = S
    for r, n in zip(SPEC.compression_ratios, SPEC.pooled_counts(S)):
        for m in range(n):
            cover[:, m * r:(m + 1) * r] += mask[:, start + m, None].long()
            assert torch.all(bias[:, start + m] == math.log(r))
        start += n
    assert torch.equal(cover, torch.ones(S, S, dtype=torch.long).tril())
    # the exact window holds at least w tokens once that many exist
    assert torch.all(mask[:, :S].sum(1) >= pos.clamp(max=SPEC.local_window - 1) + 1)


def _modules():
    kw = dict(d_model=32, num_heads=4, num_kv_heads=2)
    return {"sliding_window": SlidingWindowAttention(window=6, **kw),
            "hierarchical": HierarchicalAttention(local_window=6, compression_ratios=(2, 4, 12), **kw),
            "rf_gaussian": RationalFourierAttention(num_fourier_features=16, **kw),
            "rf_laplacian": RationalFourierAttention(num_fourier_features=16, kernel="laplacian", **kw),
            "rf_cauchy": RationalFourierAttention(num_fourier_features=16, kernel="cauchy", **kw)}


@pytest.mark.parametrize("name", list(_modules()))
def test_causal(name):
    torch.manual_seed(0)
    attn = _modules()[name]
    x = torch.randn(2, 45, 32)
    base = attn(x)
    for t in (0, 17, 44):
        x2 = x.clone()
        x2[:, t] += 1.0
        out = attn(x2)
        assert torch.equal(out[:, :t], base[:, :t]), f"position {t} changed an earlier output"
        assert (out[:, t] - base[:, t]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(_modules()))
def test_cached_decoding_matches_full_forward(name):
    # the fixed-size cache and a full key/value cache both give the full forward's outputs, step by step
    from revnet_zero.layers import KVCache
    torch.manual_seed(0)
    attn = _modules()[name].eval()
    x = torch.randn(2, 40, 32)
    full = attn(x)
    for cache in (attn.new_cache(40), KVCache(40)):
        steps = [attn(x[:, :11], cache=cache)] + [attn(x[:, i:i + 1], cache=cache) for i in range(11, 40)]
        assert rel_err(torch.cat(steps, dim=1), full) <= TOL


@pytest.mark.parametrize("kernel", rf.KERNELS)
def test_kernel_estimate_error_falls_like_one_over_sqrt_features(kernel):
    g = torch.Generator().manual_seed(0)
    x, y = 0.5 * torch.randn(20, 8, generator=g), 0.5 * torch.randn(30, 8, generator=g)
    exact = rf.exact_kernel(x, y, kernel)
    ms, errs = [256, 1024, 4096, 16384], []
    for m in ms:
        e = []
        for seed in range(6):
            w = rf.draw_frequencies(kernel, m, 8, torch.Generator().manual_seed(seed))
            est = rf.feature_map(x, w, kernel) @ rf.feature_map(y, w, kernel).t()
            e.append(rel_err(est, exact))
        errs.append(sum(e) / len(e))
    slope = (math.log(errs[-1]) - math.log(errs[0])) / (math.log(ms[-1]) - math.log(ms[0]))
    print(f"{kernel}: errors {errs}, slope {slope:.3f}")
    assert -0.65 <= slope <= -0.35, (errs, slope)
    assert errs[-1] < 0.3



def test_gaussian_features_are_positive_and_trig_ones_are_not():
    x = torch.randn(50, 8)
    assert (rf.feature_map(x, rf.draw_frequencies("gaussian", 64, 8), "gaussian") > 0).all()
    assert (rf.feature_map(x, rf.draw_frequencies("cauchy", 64, 8), "cauchy") < 0).any()


def test_fixed_features_are_a_buffer_and_learnable_ones_a_parameter():
    fixed = RationalFourierAttention(32, 4, num_fourier_features=8, seed=3)
    again = RationalFourierAttention(32, 4, num_fourier_features=8, seed=3)
    assert "frequencies" in dict(fixed.named_buffers()) and torch.equal(fixed.frequencies, again.frequencies)
    learned = RationalFourierAttention(32, 4, num_fourier_features=8, learnable_features=True)
    learned(torch.randn(1, 9, 32)).sum().backward()
    assert learned.frequencies.grad is not None and learned.frequencies.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(attention="linear"), "attention must be one of .* got 'linear'"),
    (dict(attention_window=0), "attention_window must be >= 1, got 0"),
    (dict(local_window=-2), "local_window must be >= 1, got -2"),
    (dict(compression_ratios=(4, 2), hierarchy_levels=2), r"must increase and each divide the next, got \(4, 2\)"),
    (dict(compression_ratios=(4, 6), hierarchy_levels=2), r"must increase and each divide the next, got \(4, 6\)"),
    (dict(compression_ratios=(4, 16), hierarchy_levels=3), r"hierarchy_levels=3 must equal .* \(4, 16\)"),
    (dict(rf_num_features=0), "rf_num_features must be an int >= 1, got 0"),
    (dict(rf_kernel="cauchy", rf_num_features=7), "must be even for the cauchy kernel .* got 7"),
    (dict(rf_kernel="matern"), "rf_kernel must be one of .* got 'matern'"),
    (dict(attention="sliding_window", causal=False), "'sliding_window' is causal only"),
])
def test_bad_config_values_raise_quoting_them(kwargs, match):
    from revnet_zero import TransformerConfig
    with pytest.raises(ValueError, match=match):
        TransformerConfig.preset("tiny", **kwargs)


def test_bad_module_arguments_raise_quoting_them():
    with pytest.raises(ValueError, match="attention_window must be an int >= 1, got 0"):
        SlidingWindowAttention(32, 4, window=0)
    with pytest.raises(ValueError, match=r"num_levels=2 must equal the number of compression_ratios \(2, 4, 8\)"):
        HierarchicalAttention(32, 4, num_levels=2, compression_ratios=(2, 4, 8))
    with pytest.raises(ValueError, match="backend must be one of .* got 'triton'"):
        SlidingWindowAttention(32, 4, backend="triton")
    with pytest.raises(ValueError, match="causal only"):
        RationalFourierAttention(32, 4, causal=False)
    with pytest.raises(ValueError, match="takes no attention_mask"):
        SlidingWindowAttention(32, 4, window=4)(torch.randn(1, 5, 32), attention_mask=torch.ones(1, 5))


def test_presets_for_each_variant():
    from revnet_zero import TransformerConfig
    for name, attention in [("S-sliding_window", "sliding_window"), ("S-hierarchical", "hierarchical"),
                            ("S-rational_fourier", "rational_fourier")]:
        cfg = TransformerConfig.preset(name)
        assert cfg.attention == attention and cfg.num_layers == 24 and cfg.d_model == 1024
    assert TransformerConfig.preset("S-sliding_window").attention_window == 4096
def test_random_features_stay_float32_inside_bf16_autocast():
    q, k, v = (t.detach() for t in _qkv(40))
    w = rf.draw_frequencies("gaussian", 16, 8)
    plain = rf.rf_attention(q, k, v, w, "gaussian")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = rf.rf_attention(q, k, v, w, "gaussian")
    assert rel_err(inside, plain) <= 1e-6
