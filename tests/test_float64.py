"""A float64 model is float64 end to end: central differences of the whole loss (embedding, reversible
blocks recomputed in backward, norm, fused head + loss) agree with its autograd gradient.

Tolerance: with h = 1e-5 the central difference is off by h^2/6 * f''' (~1e-11 here) plus the loss's
float64 rounding divided by h (1e-16 * 5 / 1e-5 = 5e-11). Measured worst error: about 1e-10 of the
largest gradient entry; the bound is 1e-8 of it (100x margin). A loss accumulated in float32 is off by
~1e-7 * 5 / 1e-5 = 0.05 and fails by orders of magnitude.
"""
import pytest
import torch

from revnet_zero.models import ReversibleBERT, ReversibleGPT, TransformerConfig

H = 1e-5


def tiny64(cls, causal, **attention):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=23, num_layers=3, d_model=16, num_heads=2, num_kv_heads=1, d_ff=24,
                            max_seq_len=8, causal=causal, stream_dtype=None, loss_chunk_size=5, **attention)
    return cls(cfg).double()


VARIANTS = {"softmax": {}, "sliding_window": {"attention_window": 3},
            "hierarchical": {"local_window": 2, "hierarchy_levels": 2, "compression_ratios": (2, 4)},
            # the random-feature sums once ran in float32 whatever the input: errors ~1e-3, not 1e-10
            "rational_fourier_gaussian": {"attention": "rational_fourier", "rf_num_features": 8},
            "rational_fourier_cauchy": {"attention": "rational_fourier", "rf_kernel": "cauchy", "rf_num_features": 8}}


@pytest.mark.parametrize("cls, causal, variant", [(ReversibleGPT, True, "softmax"), (ReversibleBERT, False, "softmax")]
                         + [(ReversibleGPT, True, v) for v in VARIANTS if v != "softmax"])
def test_whole_model_gradient_matches_central_differences(cls, causal, variant):
    attention = dict(VARIANTS[variant])
    if variant != "softmax":
        attention.setdefault("attention", variant)
    model = tiny64(cls, causal, **attention)
    ids = torch.randint(0, 23, (2, 7), generator=torch.Generator().manual_seed(1))
    labels = None if causal else ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator()
                                                            .manual_seed(2)) < 0.5, -100)
    loss = model(ids, labels=labels).loss
    assert loss.dtype == torch.float64
    loss.backward()
    pick = torch.Generator().manual_seed(3)
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    worst = 0.0
    with torch.no_grad():
        for p in model.parameters():
            for i in torch.randint(0, p.numel(), (2,), generator=pick).tolist():
                flat = p.view(-1)
                old = flat[i].item()
                flat[i] = old + H
                up = model(ids, labels=labels).loss.item()
                flat[i] = old - H
                down = model(ids, labels=labels).loss.item()
                flat[i] = old
                numeric = (up - down) / (2 * H)
                worst = max(worst, abs(numeric - p.grad.view(-1)[i].item()) / scale)
    print(f"{cls.__name__}: worst central-difference error {worst:.1e} of the largest gradient entry")
    assert worst <= 1e-8


def test_float64_inputs_keep_float64_streams_under_the_default_stream_dtype():
    # The default stream_dtype is float32. It used to narrow float64 streams: a float64 ReversibleSequence
    # raised "mixed dtype (CPU): expect parameter to have scalar type of Float", and a float64 model trained
    # with float32 streams (gradients 1.5e-7 off, silently). float64 in, float64 streams.
    import copy
    import sys
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from helpers import coupling, worst_rel_err

    from revnet_zero import ReversibleSequence
    torch.manual_seed(0)
    stack = ReversibleSequence([coupling("affine", 8) for _ in range(3)]).double()
    assert stack.stream_dtype == torch.float32
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    ref = copy.deepcopy(stack)
    for b in ref.blocks:
        b.policy = "store"
    grads = []
    for s in (stack, ref):
        y1, y2 = s(x)
        assert y1.dtype == y2.dtype == torch.float64
        ((y1 * 1.3).sum() + (y2 ** 2).sum()).backward()
        grads.append({n: p.grad for n, p in s.named_parameters()})
    err, name = worst_rel_err(grads[0], grads[1])
    assert err <= 1e-12, f"{name}: {err:.3g}"

    model = tiny64(ReversibleGPT, True)
    narrow = copy.deepcopy(model)
    narrow.config.stream_dtype = torch.float32
    narrow.blocks.stream_dtype = torch.float32          # what the default config used to build
    ids = torch.randint(0, 23, (2, 7), generator=torch.Generator().manual_seed(1))
    got = []
    for m in (model, narrow):
        m(ids).loss.backward()
        got.append({n: p.grad for n, p in m.named_parameters()})
    err, name = worst_rel_err(got[1], got[0])
    assert err <= 1e-12, f"{name}: {err:.3g}"
