"""The public reversible layers (ReversibleAttention, ReversibleFFN), their sub-functions and RoPE.

Tolerances as in test_models.py: 1e-6 relative for reversible vs plain autograd of the same code,
1e-5 for the hand-written reference (different code, same math).
"""
import pytest
import torch
from torch import nn

from revnet_zero import ReversibleSequence
from revnet_zero.layers import (AffineCoupling, CouplingType, FeedForward, ReversibleAttention, ReversibleFFN,
                                SelfAttention)
from revnet_zero.layers.rope import apply_rope, rope_cos_sin
from revnet_zero.ops import check_int32_numel
from helpers import rel_err
from test_models import attention, ffn, rel, update

D, H = 40, 4




def layer_pair(coupling, **attn_kw):
    torch.manual_seed(0)
    attn = ReversibleAttention(D, H, coupling=coupling, num_kv_heads=2, **attn_kw)
    ff = ReversibleFFN(D, 72, coupling_fn=AffineCoupling(split_dim=-1, scale_init=0.1)
                       if coupling == "affine" else None, activation="gelu", use_geglu=True)
    return attn, ff


def streams(S=11, seed=0):
    return torch.randn(2, 2, S, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_attention_then_ffn_is_one_transformer_block(coupling):
    attn, ff = layer_pair(coupling)
    x1, x2 = streams()
    with torch.no_grad():
        y = ff(*attn(x1, x2))
        r1 = update(attn.coupling, x1, attention(attn.attention, x2, None))
        r2 = update(ff.coupling, x2, ffn(ff.ffn, r1))
    assert rel(y[0], r1) <= 1e-5 and rel(y[1], r2) <= 1e-5
    back = attn.inverse(*ff.inverse(*y))
    assert rel(back[0], x1) <= 1e-6 and rel(back[1], x2) <= 1e-6


@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_layer_stack_reversible_grads_equal_plain_autograd(coupling):
    attn, ff = layer_pair(coupling, dropout=0.1, attention_dropout=0.1)
    attn2, ff2 = layer_pair(coupling)
    seq = ReversibleSequence([attn, ff, attn2, ff2])
    x1, x2 = streams(S=13)
    up = streams(S=13, seed=1)

    def run(policy):
        seq.set_policy(policy)
        seq.zero_grad(set_to_none=True)
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        torch.manual_seed(3)
        y1, y2 = seq(a, b)
        ((y1 * up[0]).sum() + (y2 * up[1]).sum()).backward()
        return [a.grad, b.grad] + [p.grad.clone() for p in seq.parameters()]

    for g, ref in zip(run("recompute"), run("store")):
        assert rel(g, ref) <= 1e-6


def test_single_tensor_call_uses_it_as_both_streams():
    attn = ReversibleAttention(D, H, causal=False)
    h = streams()[0].requires_grad_()
    hidden_states, coupling_output = attn(h)
    assert coupling_output is h or torch.equal(coupling_output, h)
    with torch.no_grad():
        assert rel(hidden_states, h + attention(attn.attention, h, None)) <= 1e-5
    (hidden_states.sum() + 2 * coupling_output.sum()).backward()
    g = h.grad.clone()
    h.grad = None
    attn.policy = "store"
    y1, y2 = attn(h)
    (y1.sum() + 2 * y2.sum()).backward()
    assert rel(g, h.grad) <= 1e-6


def test_seed_readme_layers():
    rev_attention = ReversibleAttention(d_model=1024, num_heads=16, coupling=CouplingType.ADDITIVE,
                                        use_rational_attention=False, attention_dropout=0.1)
    hidden_states = torch.randn(1, 7, 1024)
    hidden_states, coupling_output = rev_attention(hidden_states)
    rev_ffn = ReversibleFFN(d_model=1024, d_ff=4096, coupling_fn=AffineCoupling(split_dim=-1, scale_init=0.1),
                            activation="gelu", use_geglu=True)
    output = rev_ffn(hidden_states)
    assert isinstance(output, tuple) and output[1].shape == (1, 7, 1024)
    assert rev_ffn.ffn.w_out.out_features == 2048 and rev_ffn.ffn.w_in.out_features == 8192


def test_rational_attention_builds_random_feature_attention():
    from revnet_zero.layers import RationalFourierAttention
    layer = ReversibleAttention(64, 4, use_rational_attention=True, num_fourier_features=16, kernel="laplacian")
    assert isinstance(layer.attention, RationalFourierAttention) and layer.attention.kernel == "laplacian"
    assert layer.attention.frequencies.shape == (8, 16)          # m / 2 frequencies for cos/sin features
    y1, y2 = layer(torch.randn(1, 7, 64))
    assert y1.shape == (1, 7, 64) and torch.isfinite(y1).all()
    with pytest.raises(TypeError, match="only use_rational_attention=True takes"):
        ReversibleAttention(64, 4, kernel="cauchy")


def test_bad_layer_arguments_raise_with_values():
    c = AffineCoupling(g=FeedForward(D, 8, out_multiplier=2))
    with pytest.raises(ValueError, match="already has g set"):
        ReversibleFFN(D, 72, coupling_fn=c)
    with pytest.raises(ValueError, match="'tanh'"):
        ReversibleFFN(D, 72, activation="tanh")
    with pytest.raises(ValueError, match="d_model=40 .* num_heads=3"):
        ReversibleAttention(D, 3)
    with pytest.raises(ValueError, match="num_heads=4 .* num_kv_heads=3"):
        SelfAttention(D, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="causal attention takes no attention_mask"):
        SelfAttention(D, H)(streams()[0], attention_mask=torch.ones(2, 11))
    with pytest.raises(ValueError, match=r"\[2, 11\], got \(2, 10\)"):
        SelfAttention(D, H, causal=False)(streams()[0], attention_mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match=r"2,147,483,649 elements, more than 2\^31"):
        check_int32_numel(2**31 + 1, "x")


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=torch.float64)
    cos, sin = rope_cos_sin(0, 40, 16, 10000.0)
    rq, rk = apply_rope(q.expand(1, 1, 40, 16), cos, sin), apply_rope(k.expand(1, 1, 40, 16), cos, sin)
    scores = rq[0, 0] @ rk[0, 0].t()                         # [40, 40]
    assert torch.allclose(scores[5, 2], scores[30, 27], atol=1e-5)
    assert torch.allclose(scores[7, 7], q.flatten() @ k.flatten(), atol=1e-5)
    c2, s2 = rope_cos_sin(13, 5, 16, 10000.0)
    assert torch.allclose(c2, cos[13:18]) and torch.allclose(s2, sin[13:18])


def test_rope_function_matches_the_formula_and_gradchecks():
    """The rotation is linear: the Function keeps only cos/sin and rotates the gradient back. Its
    output equals the textbook formula; fp64 gradcheck; the gradient keeps the input's layout."""
    torch.manual_seed(0)
    cos, sin = rope_cos_sin(3, 7, 8, 10000.0)
    x = torch.randn(2, 7, 3, 8, dtype=torch.float64).transpose(1, 2).requires_grad_()   # [B, H, S, hd]
    a, b = x.chunk(2, dim=-1)
    c, s = cos.double(), sin.double()
    assert torch.allclose(apply_rope(x, c, s), torch.cat([a * c - b * s, b * c + a * s], dim=-1), atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, c, s), (x,))
    proj = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    q = proj.view(2, 7, 3, 8).transpose(1, 2)
    apply_rope(q, c, s).sum().backward()
    assert proj.grad is not None and proj.grad.shape == proj.shape


@pytest.mark.parametrize("rows", [16384, 3])
def test_rms_norm_cast_matches_nn_rmsnorm(rows, monkeypatch):
    """float32: the same arithmetic as nn.RMSNorm (<= 1e-6 relative: the backward recomputes the
    normalised rows and sums in another order); bf16 output = nn.RMSNorm's float32 output rounded
    once; float64 gradcheck; chunking (rows per chunk) changes nothing."""
    from revnet_zero.ops import norm
    monkeypatch.setattr(norm, "ROWS", rows)
    torch.manual_seed(0)
    ref = nn.RMSNorm(12, eps=1e-5)
    nn.init.normal_(ref.weight)
    x = torch.randn(2, 5, 12, requires_grad=True)
    w = ref.weight
    out = norm.rms_norm_cast(x, w, 1e-5, torch.float32)
    want = ref(x)
    assert rel_err(out, want) <= 1e-6
    g = torch.randn_like(want)
    got_grads = torch.autograd.grad(out, [x, w], g)
    want_grads = torch.autograd.grad(want, [x, w], g)
    assert max(rel_err(a, b) for a, b in zip(got_grads, want_grads)) <= 1e-6
    assert torch.equal(norm.rms_norm_cast(x, w, 1e-5, torch.bfloat16), want.to(torch.bfloat16))
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: norm.rms_norm_cast(a, b, 1e-5, torch.float64), (xd, wd))
    with pytest.raises(ValueError, match="must match the last dim"):
        norm.rms_norm_cast(x, torch.ones(5), 1e-5, torch.float32)
