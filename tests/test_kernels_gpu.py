"""revnet_zero.kernels on a GPU: tensors past 2^31 elements (int64 offsets) and medium sizes, against
the references of tests/test_kernels.py (which also runs on CUDA when one is present).

Each large test needs up to ~60 GB of GPU memory (an H200 has 139 GiB); they skip with the reason
when the GPU has less. Tolerances as in tests/test_kernels.py: the grid step bitwise, attention
float32 1e-5 and bf16 1e-2, the affine pass float32 1e-5.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
triton = pytest.importorskip("triton")

BIG = 2 ** 31 + 2 ** 21   # elements: past what an int32 offset can address


def need_gib(gib: float) -> None:
    free = torch.cuda.mem_get_info()[0] / 2 ** 30
    if free < gib:
        pytest.skip(f"needs {gib:.0f} GiB of free GPU memory, {free:.0f} GiB free")


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("m", [1, 3])
def test_cuda_grid_step_past_2_31_elements(m):
    """One sample of 524,800 x 4,096 bf16 (2.15e9 elements): the head and the tail of X_next and of the
    packed bits equal the eager path on those slices, max |b| the eager one over all of it, and the
    unstep gives X back exactly."""
    from revnet_zero.conversion import grid
    from revnet_zero.kernels import grid_step as gs
    need_gib(70)
    D = 4096
    S = BIG // D + 1
    assert S * D > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randn(1, S, D, generator=g, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, S, D, generator=g, device="cuda", dtype=torch.bfloat16)
    X = torch.randint(-2 ** 40, 2 ** 40, (1, S, D), generator=g, device="cuda")
    signs = torch.tensor([-1], device="cuda")
    X_next, packed, peak = gs.bdia_grid_step(y, x, X.clone(), signs, m)
    assert peak == grid.abs_max(grid.residual_update(y, x, -2.0 ** -m))
    for rows in (slice(0, 64), slice(S - 64, S)):
        ref_X, ref_packed, _ = gs.reference_grid_step(y[:, rows], x[:, rows], X[:, rows], signs, m)
        first = rows.start * D // 8 * m
        assert torch.equal(X_next[:, rows], ref_X), rows
        assert torch.equal(packed[first:first + ref_packed.numel()], ref_packed), rows
    back = gs.bdia_grid_unstep(y, x, X_next, packed, signs, m)
    assert torch.equal(back, X)


def test_cuda_grid_step_bitwise_at_8k_tokens():
    """A Llama-1B-sized layer output (2 x 8192 x 2048), every m, dtype and sign pattern."""
    from revnet_zero.kernels import grid_step as gs
    g = torch.Generator(device="cuda").manual_seed(0)
    for m in (1, 2, 3):
        for dtype in (torch.float32, torch.bfloat16):
            for signs in ([1, 1], [-1, -1], [1, -1]):
                y = torch.randn(2, 8192, 2048, generator=g, device="cuda").to(dtype) * 7
                x = torch.randn(2, 8192, 2048, generator=g, device="cuda").to(dtype)
                X = torch.randint(-2 ** 40, 2 ** 40, y.shape, generator=g, device="cuda")
                s = torch.tensor(signs, device="cuda")
                ref = gs.reference_grid_step(y, x, X, s, m)
                out = gs.bdia_grid_step(y, x, X.clone(), s, m)
                assert all(torch.equal(a, b) for a, b in zip(out, ref)), (m, dtype, signs)
                assert torch.equal(gs.bdia_grid_unstep(y, x, out[0], out[1], s, m), X)


def test_cuda_linear_attention_past_2_31_elements():
    """q, k, v [1, 8200, 4096, 64] bf16 (2.15e9 elements each): the first and last heads' outputs and
    gradients match the masked reference on those heads (the last head's offsets pass 2^31)."""
    from revnet_zero.kernels import causal_linear_attention, naive_causal_linear_attention
    need_gib(60)
    H, S, m = 8200, 4096, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.rand(1, H, S, m, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
    k = torch.rand(1, H, S, m, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
    v = torch.randn(1, H, S, m, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
    assert q.numel() > 2 ** 31
    out = causal_linear_attention(q, k, v, 64)
    do = torch.randn(out.shape, generator=g, device="cuda", dtype=torch.bfloat16)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    for h in (0, H - 1):
        qh, kh, vh = (t[:, h:h + 1].detach().requires_grad_() for t in (q, k, v))
        ref = naive_causal_linear_attention(qh, kh, vh)
        assert rel(out[:, h:h + 1], ref) <= 1e-2, h
        refs = torch.autograd.grad(ref, (qh, kh, vh), do[:, h:h + 1])
        for name, a, b in zip("qkv", (dq, dk, dv), refs):
            assert rel(a[:, h:h + 1], b) <= 1e-2, (h, name)


def test_cuda_affine_separate_vjp_past_2_31_elements():
    from revnet_zero.kernels import affine_separate_vjp, reference_affine_separate_vjp
    need_gib(80)
    D = 4096
    rows = BIG // D + 1
    g = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randn(rows, D, generator=g, device="cuda")
    h = torch.randn(rows, 2 * D, generator=g, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(rows, D, generator=g, device="cuda")
    tail = slice(rows - 64, rows)
    ref = reference_affine_separate_vjp(y[tail], h[tail], dy[tail], 0.1)
    x, dx, dh = affine_separate_vjp(y, h, dy, 0.1)
    for name, a, b in zip(("x", "dx", "dh"), (x[tail], dx[tail], dh[tail]), ref):
        assert rel(a, b) <= 1e-5, name


def test_cuda_liger_norm_and_rope_in_a_model_match_the_torch_ops():
    """Model 'tiny' with every attention and FFN module on kernels='liger' against the same model on the
    torch ops: loss and gradients, bf16 autocast: 2e-2 (Liger's RMSNorm computes 1/rms in another order
    and the bf16 casts can then round to neighbouring values; every layer's rounding compounds)."""
    pytest.importorskip("liger_kernel")
    from revnet_zero.models import ReversibleGPT, TransformerConfig
    torch.manual_seed(0)
    model = ReversibleGPT(TransformerConfig.preset("tiny")).cuda()
    ids = torch.randint(0, model.config.vocab_size, (2, 256), device="cuda")
    runs = []
    for kernels in ("torch", "liger"):
        for m in model.modules():
            if hasattr(m, "kernels"):
                m.kernels = kernels
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        runs.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)))
    (loss, grads), (lloss, lgrads) = runs
    assert rel(lloss, loss) <= 2e-2
    assert [a is None for a in lgrads] == [b is None for b in grads]
    assert max(rel(a, b) for a, b in zip(lgrads, grads) if b is not None) <= 2e-2
