"""A float64 model is float64 end to end: central differences of the whole loss (embedding, reversible
blocks recomputed in backward, norm, fused head + loss) agree with its autograd gradient.

Tolerance: with h = 1e-5 the central difference is off by h^2/6 * f''' (~1e-11 here) plus the loss's
float64 rounding divided by h (1e-16 * 5 / 1e-5 = 5e-11). Measured worst error: about 1e-10 of the
largest gradient entry; the bound is 1e-8 of it (100x margin). A loss accumulated in float32 is off by
~1e-7 * 5 / 1e-5 = 0.05 and fails by orders of magnitude.
"""
import pytest
import torch

from revnet_zero.models import ReversibleGPT, ReversibleBERT, TransformerConfig

H = 1e-5


def tiny64(cls, causal):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=23, num_layers=3, d_model=16, num_heads=2, num_kv_heads=1, d_ff=24,
                            max_seq_len=8, causal=causal, stream_dtype=None, loss_chunk_size=5)
    return cls(cfg).double()


@pytest.mark.parametrize("cls, causal", [(ReversibleGPT, True), (ReversibleBERT, False)])
def test_whole_model_gradient_matches_central_differences(cls, causal):
    model = tiny64(cls, causal)
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
        for name, p in model.named_parameters():
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
