"""GPU tier for the attention variants: flex_attention's forward AND backward (refused on CPU) against
the chunked SDPA path, and a bf16 training step of each variant in the reversible model.

fp32: flex and SDPA compute the same softmax in fp32 with different tilings, rel ~1e-6 (TF32 is off
in PyTorch's matmuls by default and flex does not use it for fp32), so 1e-4. bf16: both paths are
compared with a float64 reference; flex may be at most twice the chunked path's error plus 1e-3.
"""
import pytest
import torch

from helpers import rel_err
from revnet_zero import ReversibleTransformer, TransformerConfig
from revnet_zero.ops.hierarchical_attention import (HierarchySpec, hierarchical_chunked, hierarchical_flex,
                                                    hierarchical_reference)
from revnet_zero.ops.window_attention import sliding_window_chunked, sliding_window_flex, sliding_window_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SPEC = HierarchySpec(128, (4, 16, 64))

PATHS = {
    "window": (lambda q, k, v: sliding_window_flex(q, k, v, 200), lambda q, k, v: sliding_window_chunked(q, k, v, 200),
               lambda q, k, v: sliding_window_reference(q, k, v, 200)),
    "hierarchical": (lambda q, k, v: hierarchical_flex(SPEC, q, k, v),
                     lambda q, k, v: hierarchical_chunked(SPEC, q, k, v),
                     lambda q, k, v: hierarchical_reference(SPEC, q, k, v)),
}


def _run(fn, q, k, v, w):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return [out, *torch.autograd.grad((out.float() * w).sum(), (q, k, v))]


@pytest.mark.parametrize("name", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_forward_and_backward_match_chunked(name, dtype):
    torch.manual_seed(0)
    S = 1000                                  # not a multiple of the 128-token flex blocks
    q = torch.randn(1, 4, S, 64, device="cuda")
    k, v = torch.randn(2, 1, 2, S, 64, device="cuda").unbind(0)
    w = torch.randn(1, 4, S, 64, device="cuda")
    flex, chunked, ref = PATHS[name]
    cast = [t.to(dtype) for t in (q, k, v)]
    got, plain = _run(flex, *cast, w), _run(chunked, *cast, w)
    if dtype == torch.float32:
        for a, b in zip(got, plain):
            assert rel_err(a, b) <= 1e-4
    else:
        want = _run(ref, *(t.double() for t in (q, k, v)), w.double())
        for a, b, c in zip(got, plain, want):
            e_flex, e_plain = rel_err(a, c), rel_err(b, c)
            print(f"{name} bf16: flex {e_flex:.2e}, chunked {e_plain:.2e}")
            assert e_flex <= 2 * e_plain + 1e-3


@pytest.mark.parametrize("attention", ["sliding_window", "hierarchical", "rational_fourier"])
def test_variant_trains_in_bf16_on_cuda_recompute_close_to_store(attention):
    torch.manual_seed(0)
    cfg = TransformerConfig.preset("tiny", attention=attention, attention_window=64, local_window=64,
                                   compression_ratios=(4, 16), hierarchy_levels=2, rf_num_features=32,
                                   max_seq_len=1024)
    model = ReversibleTransformer(cfg).cuda()
    ids = torch.randint(0, 256, (2, 700), device="cuda")

    def grads(policy):
        model.zero_grad()
        model.blocks.set_policy(policy)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    loss_r, rec = grads("recompute")
    loss_s, sto = grads("store")
    worst = max(rel_err(rec[n], sto[n]) for n in sto)
    print(f"{attention}: loss {loss_r:.4f} vs {loss_s:.4f}, worst grad rel err recompute vs store {worst:.2e}")
    assert abs(loss_r - loss_s) <= 1e-6 * abs(loss_s)   # the same forward
    assert worst <= 2e-2          # bf16 rebuilt streams perturb the recompute (cf. tests/test_gpu.py)
