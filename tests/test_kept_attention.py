"""Kept-attention policies (store_attention / offload_attention) against the engine and autograd."""
import pytest
import torch
from torch import nn

from helpers import MLP, rel_err

from revnet_zero import AdditiveCoupling, ReversibleSequence
from revnet_zero.memory import attention
from revnet_zero.plain_reference import reference_forward


class Attn(nn.Module):
    """LayerNorm -> q, k, v -> kept-attention-aware SDPA -> out projection. [B, S, D] -> [B, S, D]."""

    def __init__(self, d, heads, kv_heads, backend="cudnn"):
        super().__init__()
        self.h, self.kv, self.hd, self.backend = heads, kv_heads, d // heads, backend
        self.norm = nn.LayerNorm(d)
        # no key bias: its gradient is zero in exact arithmetic (softmax ignores a per-query shift),
        # so a relative error on it would only compare rounding noise
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v, self.o = nn.Linear(d, kv_heads * self.hd), nn.Linear(d, d)

    def forward(self, x, **_):
        B, S, D = x.shape
        h = self.norm(x)
        q = self.q(h).view(B, S, self.h, self.hd).transpose(1, 2)
        k = self.k(h).view(B, S, self.kv, self.hd).transpose(1, 2)
        v = self.v(h).view(B, S, self.kv, self.hd).transpose(1, 2)
        out = attention(q, k, v, is_causal=True, cuda_backend=self.backend)
        return self.o(out.transpose(1, 2).reshape(B, S, D))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_store_attention_matches_recompute_and_autograd(kv_heads):
    torch.manual_seed(0)
    d = 32
    stack = ReversibleSequence([AdditiveCoupling(Attn(d, 4, kv_heads), MLP(d)) for _ in range(5)])
    x, w1, w2 = torch.randn(2, 13, d), torch.randn(2, 13, d), torch.randn(2, 13, d)

    def grads(run):
        a = x.detach().requires_grad_()
        y1, y2 = run(a)
        return torch.autograd.grad((y1 * w1).sum() + (y2 * w2).sum(), [a, *stack.parameters()])

    ref = grads(lambda a: reference_forward(stack, a))
    results = {}
    for policy in ("recompute", "store_attention", "offload_attention"):
        stack.set_policy(policy)
        stack.set_policy("store", layers=[2])  # a stored block between kept ones
        results[policy] = grads(stack)
    for policy, g in results.items():
        err = max(rel_err(a, b) for a, b in zip(g, ref))
        assert err <= 1e-6, (policy, err)


def test_kept_attention_keeps_output_and_logsumexp_only():
    torch.manual_seed(1)
    d, S = 32, 64
    stack = ReversibleSequence([AdditiveCoupling(Attn(d, 4, 4), MLP(d)) for _ in range(3)])
    x = torch.randn(1, S, d, requires_grad=True)
    stack.set_policy("store_attention")
    y1, y2 = stack(x)
    stores = y1.grad_fn.store, y1.grad_fn.next_functions[0][0].store
    for st in stores:
        # out [1, 4, S, 8] float32 and logsumexp [1, 4, S] float32 (CPU kernel)
        assert st.nbytes == (S * d + 4 * S) * 4
    (y1 + y2).sum().backward()


def test_kept_attention_refuses_dropout_and_generic_couplings():
    from helpers import ShiftCoupling
    from revnet_zero import ReversibleBlock
    with pytest.raises(ValueError, match="needs a built-in"):
        ReversibleBlock(ShiftCoupling(8), policy="store_attention")
    q = torch.randn(1, 2, 4, 8)
    from revnet_zero.ops.kept_attention import AttentionStore, using_store
    with using_store(AttentionStore(), recording=True), pytest.raises(ValueError, match="dropout 0, got 0.1"):
        attention(q, q, q, is_causal=True, dropout_p=0.1)


def test_recompute_does_not_rerun_attention(monkeypatch):
    import revnet_zero.ops.kept_attention as ka
    calls = []
    real_fwd, real_sdpa = ka._forward, ka.F.scaled_dot_product_attention
    monkeypatch.setattr(ka, "_forward", lambda *a: calls.append("kept") or real_fwd(*a))
    monkeypatch.setattr(ka.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append("sdpa") or real_sdpa(*a, **k))
    stack = ReversibleSequence([AdditiveCoupling(Attn(16, 2, 2), MLP(16)) for _ in range(3)])
    x = torch.randn(1, 9, 16, requires_grad=True)
    stack.set_policy("store_attention")
    y1, y2 = stack(x)
    assert calls == ["kept"] * 3
    (y1 + y2).sum().backward()
    assert calls == ["kept"] * 3  # the backward ran no attention forward at all
    stack.set_policy("recompute")
    calls.clear()
    y1, y2 = stack(x)
    (y1 + y2).sum().backward()
    assert calls == ["sdpa"] * 6  # full recompute: attention once in forward, once in backward


def test_kernels_take_the_projections_layout_without_copies(monkeypatch):
    """q, k, v reach the attention kernel as [B, S, H, hd]-laid views of the projections' outputs
    (no transposing copy of v, none of the output or of its gradient), forward and backward."""
    import revnet_zero.ops.kept_attention as ka
    from revnet_zero.layers import ReversibleAttention
    seen = []
    real = ka._forward
    monkeypatch.setattr(ka, "_forward", lambda q, k, v, *a: seen.append((q, k, v)) or real(q, k, v, *a))
    layer = ReversibleAttention(d_model=32, num_heads=4, policy="store_attention")
    x = torch.randn(2, 9, 32, requires_grad=True)
    y1, y2 = layer(x)
    (q, k, v), = seen
    for t in (q, k, v):
        assert t.shape == (2, 4, 9, 8) and t.transpose(1, 2).is_contiguous(), t.stride()
    assert v._base is not None and v._base.shape == (2, 9, 32)  # the wv projection's own output, viewed
    (y1 * y2).sum().backward()
    # a [B, H, S, hd]-contiguous tensor is re-laid once, values unchanged
    t = torch.randn(2, 4, 9, 8)
    assert ka.bshd(t).transpose(1, 2).is_contiguous() and torch.equal(ka.bshd(t), t)
    assert ka.bshd(q) is q
