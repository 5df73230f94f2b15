"""The reversible models against plain autograd and against a hand-written residual reference.

Tolerances (relative error of the whole tensor, ||a - b|| / ||b||, float32):
- reversible ('recompute') vs the same model under plain autograd ('store'): 1e-6. The forward is the
  same computation (losses are bitwise equal); backward differs only in that each block's inputs are
  rebuilt by subtraction (x1 = y1 - F(x2)), each rebuild off by about one float32 rounding of the
  stream (6e-8 relative), which the gradients inherit; measured 2-3e-7 on these 3-block models.
- model vs the hand-written reference below: 1e-5. Different code for the same math (SDPA vs an
  explicit softmax, RoPE by complex multiplication in float64), so roundings differ at every op.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import revnet_zero
from revnet_zero.engine import POLICIES
from revnet_zero.layers import reversible_attention
from revnet_zero.models import (ModelOutput, ReversibleBERT, ReversibleGPT, ReversibleTransformer,
                                TransformerConfig)
from revnet_zero.models import reversible_transformer

V = 37


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def small(cls=ReversibleGPT, **kw):
    """3 blocks, d = 40 (not a power of two), 4 heads of 10, vocab 37."""
    args = dict(vocab_size=V, num_layers=3, d_model=40, num_heads=4, num_kv_heads=2, d_ff=72,
                max_seq_len=64, causal=cls is not ReversibleBERT)
    torch.manual_seed(0)
    model = cls(TransformerConfig(**{**args, **kw}))
    with torch.no_grad():                     # norm weights away from 1, so the reference must use them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def ids_and_mask(B=2, S=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 4:] = 0
    return ids, mask


def loss_and_grads(model, *args, **kw):
    model.zero_grad(set_to_none=True)
    out = model(*args, **kw)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- hand-written plain reference

def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, theta):
    """x [B, S, H, hd]; pairs (i, i + hd/2) rotated by pos * theta^(-2i/hd), as complex numbers."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angles = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * freqs
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None]           # (S, 1, hd/2)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * rotation
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def attention(sa, x, mask):
    B, S, D = x.shape
    H, Hkv, hd = sa.num_heads, sa.num_kv_heads, sa.head_dim
    h = rms(x, sa.norm.weight, sa.norm.eps)
    q = rope((h @ sa.wq.weight.t()).view(B, S, H, hd), sa.rope_theta)
    k = rope((h @ sa.wk.weight.t()).view(B, S, Hkv, hd), sa.rope_theta).repeat_interleave(H // Hkv, dim=2)
    v = (h @ sa.wv.weight.t()).view(B, S, Hkv, hd).repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    if sa.causal:
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, S, D)
    return out @ sa.wo.weight.t()


def ffn(ff, x):
    h = rms(x, ff.norm.weight, ff.norm.eps) @ ff.w_in.weight.t()
    act = {"silu": F.silu, "gelu": F.gelu}[ff.activation]
    if ff.gated:
        gate, up = h.chunk(2, dim=-1)
        h = act(gate) * up
    else:
        h = act(h)
    return h @ ff.w_out.weight.t()


def update(coupling, x, h):
    if type(coupling).__name__ == "AdditiveCoupling":
        return x + h
    a, t = h.chunk(2, dim=-1)
    return x * torch.exp(coupling.scale_init * torch.tanh(a)) + t


def block_reference(block, x1, x2, mask=None):
    c = block.coupling
    y1 = update(c, x1, attention(c.f, x2, mask))
    y2 = update(c, x2, ffn(c.g, y1))
    return y1, y2


def model_reference(model, ids, mask=None):
    x1 = x2 = model.embed.weight[ids] * model.config.embed_scale   # streams start at the scaled embedding
    for block in model.blocks.blocks:
        x1, x2 = block_reference(block, x1, x2, mask)
    hidden = rms((x1 + x2) / 2, model.norm.weight, model.norm.eps)
    return hidden, hidden @ model.head.weight.t()


# ---------------------------------------------------------------- gradients

CASES = [(cls, coupling, kv) for cls in (ReversibleGPT, ReversibleBERT)
         for coupling in ("additive", "affine") for kv in (4, 2)]


@pytest.mark.parametrize("cls,coupling,kv", CASES)
def test_reversible_grads_equal_plain_autograd(cls, coupling, kv):
    model = small(cls, coupling=coupling, num_kv_heads=kv)
    ids, mask = ids_and_mask()
    kw = {"labels": ids, "attention_mask": mask} if cls is ReversibleBERT else {}
    loss, grads = loss_and_grads(model, ids, **kw)
    model.blocks.set_policy("store")
    ref_loss, ref_grads = loss_and_grads(model, ids, **kw)
    assert torch.equal(loss, ref_loss)
    for name, g in grads.items():
        assert rel(g, ref_grads[name]) <= 1e-6, name
    # the gradient reaching the embedding output, through the block stack alone
    x = (model.embed(ids) * model.config.embed_scale).detach()
    up = torch.randn(2, *x.shape, generator=torch.Generator().manual_seed(3))
    block_kw = {"attention_mask": mask} if cls is ReversibleBERT else {}
    dx = []
    for policy in ("recompute", "store"):
        model.blocks.set_policy(policy)
        xr = x.clone().requires_grad_()
        y1, y2 = model.blocks(xr, **block_kw)
        ((y1 * up[0]).sum() + (y2 * up[1]).sum()).backward()
        dx.append(xr.grad)
    assert rel(dx[0], dx[1]) <= 1e-6


@pytest.mark.parametrize("cls", [ReversibleGPT, ReversibleBERT])
def test_every_engine_policy_gives_the_plain_autograd_grads(cls):
    model = small(cls, coupling="affine")
    ids, mask = ids_and_mask()
    kw = {"labels": ids, "attention_mask": mask} if cls is ReversibleBERT else {}
    model.blocks.set_policy("store")
    ref_loss, ref_grads = loss_and_grads(model, ids, **kw)
    for policy in POLICIES:
        model.blocks.set_policy(policy)
        model.blocks.set_policy("recompute", layers=[1])     # mixed runs of policies too
        loss, grads = loss_and_grads(model, ids, **kw)
        assert torch.equal(loss, ref_loss), policy
        for name, g in grads.items():
            assert rel(g, ref_grads[name]) <= 1e-6, (policy, name)


@pytest.mark.parametrize("cls,coupling", [(ReversibleGPT, "additive"), (ReversibleGPT, "affine"),
                                          (ReversibleBERT, "additive")])
def test_model_equals_hand_written_residual_reference(cls, coupling):
    model = small(cls, coupling=coupling, ffn="geglu" if coupling == "affine" else "swiglu")
    ids, mask = ids_and_mask()
    amask = mask if cls is ReversibleBERT else None
    x1, x2 = torch.randn(2, 2, 13, 40, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ys = model.blocks.blocks[0](x1, x2, **({"attention_mask": amask} if amask is not None else {}))
        ref = block_reference(model.blocks.blocks[0], x1, x2, amask)
    assert rel(ys[0], ref[0]) <= 1e-5 and rel(ys[1], ref[1]) <= 1e-5
    # whole model, training (reversible backward) against autograd of the reference
    kw = {"labels": ids, "attention_mask": mask} if cls is ReversibleBERT else {}
    loss, grads = loss_and_grads(model, ids, **kw)
    model.zero_grad(set_to_none=True)
    hidden, logits = model_reference(model, ids, amask)
    if cls is ReversibleBERT:
        ref_loss = F.cross_entropy(logits.reshape(-1, V), ids.reshape(-1))
    else:
        ref_loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    ref_loss.backward()
    assert rel(loss, ref_loss) <= 1e-6
    for name, p in model.named_parameters():
        assert rel(grads[name], p.grad) <= 1e-5, name
    model.eval()
    out = model(ids, **({"attention_mask": mask} if amask is not None else {}))
    rows = mask.bool() if cls is ReversibleBERT else torch.ones_like(mask, dtype=torch.bool)
    assert rel(out.logits[rows], logits.detach()[rows]) <= 1e-5


def test_dropout_reversible_grads_equal_store_under_same_seed():
    model = small(dropout=0.2, attention_dropout=0.2, coupling="affine")
    ids, _ = ids_and_mask()
    torch.manual_seed(7)
    loss, grads = loss_and_grads(model, ids)
    model.blocks.set_policy("store")
    torch.manual_seed(7)
    ref_loss, ref_grads = loss_and_grads(model, ids)
    assert torch.equal(loss, ref_loss)
    for name, g in grads.items():
        assert rel(g, ref_grads[name]) <= 1e-6, name
    torch.manual_seed(8)
    assert not torch.equal(model(ids).loss, loss)          # dropout is really on


def test_ffn_tiling_changes_nothing():
    ids, _ = ids_and_mask(S=29)
    loss, grads = loss_and_grads(small(ffn_chunk_size=None), ids)
    tiled = small(ffn_chunk_size=8)
    lengths = []
    for block in tiled.blocks.blocks:
        block.coupling.g.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    tiled_loss, tiled_grads = loss_and_grads(tiled, ids)
    assert sorted(set(lengths)) == [5, 8]                  # 29 = 8 + 8 + 8 + 5, forward and recompute
    assert rel(tiled_loss, loss) <= 1e-6
    for name, g in grads.items():
        assert rel(tiled_grads[name], g) <= 1e-6, name


# ---------------------------------------------------------------- loss, labels, logits

def test_chunked_loss_equals_full_logits_loss_with_labels_and_ignore_index():
    model = small(loss_chunk_size=5)
    ids, _ = ids_and_mask(S=15)
    labels = ids.clone()
    labels[0, 3:7] = -100
    labels[1, -1] = -100
    out = model(ids, labels=labels, return_logits=True)
    logits = model.head(out.last_hidden_state)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert rel(out.loss, ref) <= 1e-6
    assert torch.equal(out.logits, logits)
    assert rel(model(ids).loss, F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))) <= 1e-6


def test_right_padding_mask_drops_pad_targets_and_leaves_real_positions_alone():
    model = small().eval()
    ids, mask = ids_and_mask()                             # row 1: last 4 positions are padding
    out = model(ids, attention_mask=mask)
    short = model(ids[1:, :9])
    assert rel(out.last_hidden_state[1, :9], short.last_hidden_state[0]) <= 1e-6
    logits = out.logits
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    assert rel(out.loss, ref) <= 1e-6


def test_logits_absent_in_training_present_in_eval(monkeypatch):
    model = small()
    ids, _ = ids_and_mask()
    out = model(ids)
    assert isinstance(out, ModelOutput) and out.logits is None and out.loss.requires_grad
    assert out.last_hidden_state.shape == (2, 13, 40)
    model.eval()
    assert model(ids).logits.shape == (2, 13, V)
    monkeypatch.setattr(reversible_transformer, "LOGITS_MAX_SEQ", 12)
    assert model(ids).logits is None and model(ids, return_logits=True).logits is not None


def test_bert_outputs_ignore_padding_tokens():
    model = small(ReversibleBERT).eval()
    ids, mask = ids_and_mask()
    out = model(ids, attention_mask=mask).last_hidden_state
    other = ids.clone()
    other[1, -4:] = (other[1, -4:] + 5) % V
    out2 = model(other, attention_mask=mask).last_hidden_state
    assert torch.equal(out[1, :-4], out2[1, :-4]) and torch.equal(out[0], out2[0])
    alone = model(ids[1:, :-4]).last_hidden_state
    assert rel(out[1, :-4], alone[0]) <= 1e-6
    assert model(ids).loss is None


def test_bert_masked_attention_in_query_tiles_is_exact(monkeypatch):
    model = small(ReversibleBERT).eval()
    ids, mask = ids_and_mask()
    whole = model(ids, attention_mask=mask).last_hidden_state
    monkeypatch.setattr(reversible_attention, "INT32_MAX_NUMEL", 13 * 4 + 1)    # tiles of 4 queries
    tiled = model(ids, attention_mask=mask).last_hidden_state
    assert rel(tiled, whole) <= 1e-6


def test_bf16_autocast_trains_with_float32_streams():
    model = small(coupling="affine")
    ids, _ = ids_and_mask()
    ref_loss, ref_grads = loss_and_grads(model, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, ids)
        streams = model.blocks(model.embed(ids) * model.config.embed_scale)
    assert all(s.dtype == torch.float32 for s in streams)
    assert rel(loss, ref_loss) <= 2e-2                      # bf16 matmuls: a few 2^-8 steps
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_tied_embeddings_share_the_head():
    model = small(tie_embeddings=True)
    assert model.head.weight is model.embed.weight
    loss, grads = loss_and_grads(model, ids_and_mask()[0])
    assert "head.weight" not in grads and grads["embed.weight"].abs().sum() > 0


# ---------------------------------------------------------------- generation

def greedy_without_cache(model, ids, n):
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("kw", [{}, {"coupling": "affine", "num_kv_heads": 4, "ffn_chunk_size": 3}])
def test_cached_generation_equals_uncached_greedy(kw):
    model = small(**kw).eval()
    prompt = ids_and_mask(S=7)[0]
    out = model.generate(prompt, max_new_tokens=10, temperature=0)
    assert torch.equal(out, greedy_without_cache(model, prompt, 10))
    assert torch.equal(model.generate(prompt, 10, temperature=0.7, top_k=1), out)
    torch.manual_seed(0)
    sampled = model.generate(prompt, 10, temperature=1.0, top_k=5)
    assert sampled.shape == (2, 17) and torch.equal(sampled[:, :7], prompt)


def test_generate_refuses_past_max_seq_len():
    with pytest.raises(ValueError, match="60 \\+ max_new_tokens 5 = 65 exceeds max_seq_len=64"):
        small().generate(torch.zeros(1, 60, dtype=torch.long), 5)


# ---------------------------------------------------------------- construction, presets, bad inputs

def test_seed_constructor_and_presets():
    with torch.device("meta"):
        model = revnet_zero.ReversibleTransformer(num_layers=24, d_model=1024, num_heads=16,
                                                  max_seq_len=262144, use_flash_attention=True)
    assert len(model.blocks.blocks) == 24 and model.config.d_ff == 2816
    assert isinstance(model.blocks, revnet_zero.ReversibleSequence)
    s, m, l8 = (TransformerConfig.preset(n) for n in ("S", "M", "llama8b"))
    assert (s.num_layers, s.d_model, s.num_heads, s.d_ff, s.vocab_size) == (24, 1024, 16, 2816, 32000)
    assert (m.d_model, m.d_ff) == (2048, 5632)
    assert (l8.num_layers, l8.d_model, l8.num_heads, l8.num_kv_heads, l8.d_ff, l8.vocab_size) == \
        (32, 4096, 32, 8, 14336, 128256)
    assert TransformerConfig(ffn="gelu", d_model=96, num_heads=4).d_ff == 384
    assert ReversibleGPT(TransformerConfig.preset("tiny"), num_layers=1).config.num_layers == 1


@pytest.mark.parametrize("kw,err,match", [
    (dict(d_model=40, num_heads=3), ValueError, "d_model=40 .* num_heads=3"),
    (dict(num_heads=4, num_kv_heads=3), ValueError, "num_heads=4 .* num_kv_heads=3"),
    (dict(coupling="sideways"), ValueError, "'sideways'"),
    (dict(ffn="relu2"), ValueError, "'relu2'"),
    (dict(dropout=1.5), ValueError, "1.5"),
    (dict(use_flash_attention=False), ValueError, "S x S"),
    (dict(vocab_size=128256, loss_chunk_size=20000), ValueError, "2,565,120,000"),
    (dict(num_layers=0), ValueError, "num_layers must be >= 1, got 0"),
    (dict(d_model=40.0), TypeError, "d_model must be an int, got 40.0"),
    (dict(stream_dtype=torch.int32), ValueError, "torch.int32"),
    (dict(embed_scale=float("nan")), ValueError, "embed_scale must be a finite positive number, got nan"),
    (dict(embed_scale=-1.0), ValueError, "embed_scale must be a finite positive number, got -1.0"),
    (dict(rope_theta=float("inf")), ValueError, "rope_theta must be a finite positive number, got inf"),
    (dict(norm_eps=float("nan")), ValueError, "norm_eps must be a finite positive number, got nan"),
])
def test_config_validation_quotes_values(kw, err, match):
    with pytest.raises(err, match=match):
        TransformerConfig(**kw)


def test_bad_model_inputs_raise_with_values():
    model = small()
    with pytest.raises(TypeError, match=r"\['colour', 'heads'\]"):
        ReversibleTransformer(num_layers=1, heads=4, colour="red")
    with pytest.raises(ValueError, match="min -1, max 37"):
        model(torch.tensor([[1, 37, -1]]))
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.float32"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"\(1, 5\)"):
        model(torch.zeros(1, 5, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 37\).*from 40 to 40"):
        model(torch.zeros(1, 5, dtype=torch.long), labels=torch.full((1, 5), 40))
    with pytest.raises(ValueError, match="right padding"):
        model(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"0 \(padding\) and 1"):
        model(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.full((1, 5), 2))
    with pytest.raises(ValueError, match="causal=True"):
        ReversibleTransformer(TransformerConfig.preset("tiny", causal=False))
    with pytest.raises(ValueError, match=r"rows \[1\] have no tokens"):
        small(ReversibleBERT)(torch.zeros(2, 5, dtype=torch.long),
                              attention_mask=torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]))


def test_int32_guard_refuses_oversized_tensors(monkeypatch):
    from revnet_zero.layers import reversible_ffn
    model = small(ffn_chunk_size=None)
    monkeypatch.setattr(reversible_ffn, "check_int32_numel", _strict_check(2 * 13 * 144 - 1))
    with pytest.raises(ValueError, match="ffn_chunk_size"):
        model(ids_and_mask()[0])
    with pytest.raises(ValueError, match="logits"):
        TransformerConfig(vocab_size=2**20, loss_chunk_size=2**12)


def _strict_check(limit):
    def check(numel, what, hint=""):
        if numel > limit:
            raise ValueError(f"{what}: {numel} > {limit}. {hint}")
    return check


# ---------------------------------------------------------------- training

TEXT = (b"Reversible layers rebuild their inputs from their outputs, so training keeps no activations. "
        b"The two streams are added and subtracted; nothing else is stored. ")


def test_tiny_model_learns_repeated_text():
    torch.manual_seed(0)
    model = ReversibleGPT(TransformerConfig.preset("tiny", num_layers=2, d_model=64, num_heads=4))
    data = torch.tensor(list(TEXT * 8))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(200):
        starts = torch.randint(0, len(data) - 65, (8,), generator=g)
        batch = torch.stack([data[s:s + 64] for s in starts])
        loss = model(batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert first > 5.0                                      # about ln 256 = 5.55 at the start
    assert last < 0.1 * first, (first, last)              # measured: 5.56 -> 0.067


def test_bf16_weights_with_float32_streams_without_autocast():
    """Weights loaded in bf16 (e.g. from_pretrained(dtype=bfloat16)) with the default float32 streams."""
    model = small().to(torch.bfloat16)
    ids, _ = ids_and_mask()
    loss = model(ids).loss
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_float_labels_are_refused_not_truncated():
    model = small()
    ids = torch.randint(0, 37, (1, 6))
    with pytest.raises(TypeError, match="labels must be integer token ids .* got torch.float32"):
        model(ids, labels=ids.float() + 0.7)
    assert model(ids, labels=ids.int()).loss.isfinite()
