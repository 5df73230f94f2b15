"""revnet_zero.kernels against their plain PyTorch references.

Without a GPU the kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is set by
conftest.py, before Triton is first imported (Triton's own library functions are made interpreted or
compiled at that import; other test modules import transformers, which imports Triton), and again
here for a run of this file alone. With a GPU they run on CUDA, as compiled. Shapes are tiny: the
interpreter runs a kernel's programs one by one in numpy.

Tolerances (max |kernel - reference| / max |reference|, per output):
* BDIA grid step and unstep: none, bitwise (``torch.equal``). Integer arithmetic, exact products by
  powers of two, and each float op rounded to the dtype as eager PyTorch rounds it.
* causal linear attention, float32 inputs: 1e-5. Both sum the same float32 products, in another order
  (chunk state vs one S x S product): a few float32 ulps times the sum's length at S <= 200.
* causal linear attention, bfloat16 inputs and outputs: 1e-2. Both compute in float32 from the same
  bf16 values; the outputs are rounded once to bf16 (2^-8 = 3.9e-3 relative), and the interpreter's
  float32 -> bf16 cast truncates rather than rounds, which can double that.
* affine stream rebuild and vjp, float32: 1e-5. Triton's exp (and tanh written from exp) differ
  from PyTorch's by a few ulps; ``x = (y - t) / s`` and ``da = dy·s·x·c·(1 - th²)`` carry that through
  a few products.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from revnet_zero import kernels as K  # noqa: E402
from revnet_zero.kernels import grid_step as gs  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_runs_interpreted_without_a_gpu():
    """Guards the setup above: on a CPU, Triton's library and this package's kernels are interpreted."""
    if DEV == "cuda":
        assert not K.interpreting()
        return
    from triton.runtime.interpreter import InterpretedFunction
    assert K.interpreting() and isinstance(gs._step_kernel, InterpretedFunction)
    assert isinstance(tl.sum, InterpretedFunction), "Triton was imported before TRITON_INTERPRET=1 was set"


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def grid_inputs(shape, dtype, signs, g):
    B = shape[0]
    scale = 10.0 ** torch.randint(-3, 4, (B, *shape[1:-1], 1), generator=g)   # magnitudes 1e-3 .. 1e3
    y = (torch.randn(shape, generator=g) * scale).to(DEV, dtype)
    x = (torch.randn(shape, generator=g) * 5).to(DEV, dtype)
    X = torch.randint(-2 ** 40, 2 ** 40, shape, generator=g).to(DEV)
    return y, x, X, torch.tensor(signs, device=DEV)


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("signs", [[1, 1], [-1, -1], [1, -1]], ids=["plus", "minus", "mixed"])
def test_grid_step_and_unstep_are_bitwise_the_eager_path(m, dtype, signs):
    """Forward (X_next, packed bits, max |b|) and backward (X_prev) equal grid.update_forward /
    update_backward bit for bit; sizes whose bits do not fill whole bytes and that span several programs."""
    g = torch.Generator().manual_seed(m)
    for shape in ((2, 31, 7), (2, 300, 9)):
        y, x, X, s = grid_inputs(shape, dtype, signs, g)
        ref = gs.reference_grid_step(y, x, X, s, m)
        out = gs.bdia_grid_step(y, x, X.clone(), s, m)
        for name, a, b in zip(("X_next", "packed", "peak"), out, ref):
            assert torch.equal(a, b), (shape, name, (a != b).sum().item())
        back = gs.bdia_grid_unstep(y, x, out[0], out[1], s, m)
        assert torch.equal(back, X) and torch.equal(back, gs.reference_grid_unstep(y, x, ref[0], ref[1], s, m))


@triton.jit
def _roundings(v_ptr, i_ptr, b_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    tl.store(i_ptr + offs, gs._round_half_even(v), mask=mask)
    tl.store(b_ptr + offs, gs._round_bf16(v), mask=mask)


def test_the_kernels_roundings_are_pytorchs():
    """The two roundings the grid kernels write out: half-to-even to int64 (torch.round) and float32 to
    bfloat16 to nearest even (PyTorch's cast), on exact ties of both, random values over many
    magnitudes, and NaN / inf / the largest float (which rounds to inf in bf16)."""
    g = torch.Generator().manual_seed(0)
    mag = 2.0 ** torch.randint(-30, 56, (4000,), generator=g).double()   # |v| < 2^62: int64 holds it
    ties = torch.arange(-40, 40, dtype=torch.float64) + 0.5
    bf16_ties = torch.tensor([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, -(1 + 2.0 ** -8), 3 * 2.0 ** -9], dtype=torch.float64)
    v = torch.cat([torch.randn(4000, generator=g, dtype=torch.float64) * mag, ties, bf16_ties]).float().to(DEV)
    i, b = torch.empty(v.shape, dtype=torch.int64, device=DEV), torch.empty_like(v)
    _roundings[(triton.cdiv(v.numel(), 1024),)](v, i, b, v.numel(), BLOCK=1024)
    assert torch.equal(i, v.round().long())
    assert torch.equal(b, v.bfloat16().float())
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), torch.finfo(torch.float32).max], device=DEV)
    _roundings[(1,)](special, i[:4], b[:4], 4, BLOCK=16)
    assert b[0].isnan() and torch.equal(b[1:4], special[1:].bfloat16().float())


def test_grid_step_peak_is_not_finite_when_an_update_is_not():
    """A NaN or inf in a layer's output makes max |b| NaN (NaN given) or non-finite, as eagerly, so the
    run's range check refuses it (the grid integers of such values are meaningless either way)."""
    from revnet_zero.conversion.grid import check_range
    g = torch.Generator().manual_seed(0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y, x, X, s = grid_inputs((2, 40, 8), torch.float32, [1, -1], g)
        y[1, 7, 3] = bad
        ref_peak = gs.reference_grid_step(y, x, X, s, 1)[2]
        peak = gs.bdia_grid_step(y, x, X.clone(), s, 1)[2]
        assert not peak.isfinite() and not ref_peak.isfinite()
        assert peak.isnan() == ref_peak.isnan() or bad == bad, bad   # NaN in: NaN out in both
        with pytest.raises(FloatingPointError):
            check_range(peak)


def test_grid_step_refuses_bad_input_with_the_shapes():
    y, x, X, s = grid_inputs((2, 5, 8), torch.float32, [1, -1], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"y \(2, 5, 8\), x \(2, 5, 7\)"):
        gs.bdia_grid_step(y, x[..., :7], X, s, 1)
    with pytest.raises(TypeError, match="float32 or bfloat16, got torch.float16"):
        gs.bdia_grid_step(y.half(), x.half(), X, s, 1)
    with pytest.raises(ValueError, match=r"signs must be \[B\].*got \(3,\)"):
        gs.bdia_grid_step(y, x, X, torch.ones(3, dtype=torch.int64, device=DEV), 1)
    with pytest.raises(ValueError, match="packed must be uint8 of 30 bytes"):
        gs.bdia_grid_unstep(y, x, X, torch.zeros(29, dtype=torch.uint8, device=DEV), s, 3)


def test_converted_training_with_the_triton_grid_step_changes_no_bit(monkeypatch):
    """convert_to_reversible(grid_step='triton'): the kernels run in every layer's step (forward and
    backward), and loss and gradients equal the eager step's bit for bit (bf16 autocast: the layer
    outputs are bf16, so the bf16 rounding path runs too)."""
    transformers = pytest.importorskip("transformers")
    from revnet_zero.conversion import convert_to_reversible
    from revnet_zero.conversion.bdia import BDIALayer
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(config).to(DEV)
    ids = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(1)).to(DEV)
    calls = []
    for name in ("bdia_grid_step", "bdia_grid_unstep"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a))[1])
    results = {}
    for mode in ("eager", "triton"):
        model = convert_to_reversible(original, verbose=False, grid_step=mode).train()
        step = next(m.grid_step for m in model.modules() if isinstance(m, BDIALayer))
        step.devices = ("cuda", "cpu")
        torch.manual_seed(2)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
        assert step.failed is None and step.kind(torch.ones(1, device=DEV)) == mode
    assert sorted(calls) == sorted(["bdia_grid_step", "bdia_grid_unstep"] * 2)   # layers 1 and 2 of 0..2
    (loss, grads), (tloss, tgrads) = results["eager"], results["triton"]
    assert torch.equal(loss, tloss)
    assert all(torch.equal(grads[n], tgrads[n]) for n in grads)


def attention_inputs(B, H, S, m, dv, dtype, g, strided=False):
    q = torch.rand(B, S, H, m, generator=g).transpose(1, 2) if strided else torch.rand(B, H, S, m, generator=g)
    k = torch.rand(B, H, S, m, generator=g)
    v = torch.randn(B, H, S, dv, generator=g)
    return [t.to(DEV, dtype).requires_grad_() for t in (q, k, v)]


ATTENTION_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}   # reasons in the module docstring


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [(1, 2, 50, 8, 12, 16, False), (2, 1, 70, 20, 70, 32, True)],
                         ids=["short", "strided-q-wide-v"])
def test_causal_linear_attention_matches_the_masked_reference(dtype, case):
    """Output and the gradients of q, k, v against the S x S masked reference (plain autograd); lengths
    that are not a multiple of the chunk, feature and value widths that are not powers of two, a q laid
    out [B, S, H, m] (a projection's output), v wider than one value block."""
    B, H, S, m, dv, chunk, strided = case
    q, k, v = attention_inputs(B, H, S, m, dv, dtype, torch.Generator().manual_seed(0), strided)
    out = K.causal_linear_attention(q, k, v, chunk)
    ref = K.naive_causal_linear_attention(q, k, v)
    assert out.dtype == v.dtype and out.shape == (B, H, S, dv)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    tol = ATTENTION_TOL[dtype]
    assert rel(out, ref) <= tol
    for name, a, b in zip("qkv", grads, ref_grads):
        assert a.dtype == b.dtype and rel(a, b) <= tol, (name, rel(a, b))


def test_causal_linear_attention_is_causal():
    """Changing the last position's q, k and v changes no earlier output, and no earlier input's gradient
    through an earlier output."""
    q, k, v = attention_inputs(1, 1, 40, 8, 8, torch.float32, torch.Generator().manual_seed(0))
    out = K.causal_linear_attention(q, k, v, 16)
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, -1] += 3.0
    out2 = K.causal_linear_attention(q2, k2, v2, 16)
    assert torch.equal(out[:, :, :-1], out2[:, :, :-1]) and not torch.equal(out[:, :, -1], out2[:, :, -1])


def test_rf_attention_module_and_its_checks():
    q, k, v = attention_inputs(1, 2, 33, 4, 8, torch.float32, torch.Generator().manual_seed(0))
    attn = K.TritonRFAttention(chunk_size=16)
    assert rel(attn(q, k, v), K.naive_causal_linear_attention(q, k, v)) <= ATTENTION_TOL[torch.float32]
    with pytest.raises(ValueError, match="power of two >= 16.*got 24"):
        K.TritonRFAttention(chunk_size=24)
    with pytest.raises(ValueError, match=r"got q \(1, 2, 33, 4\), k \(1, 2, 32, 4\)"):
        attn(q, k[:, :, :32], v)


def test_custom_ops_pass_opcheck():
    """The ops' schemas, fake (meta) functions and autograd registration are what torch.library
    expects, so torch.compile and autograd see ordinary ops."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (t.detach().requires_grad_() for t in attention_inputs(1, 1, 20, 4, 4, torch.float32, g))
    torch.library.opcheck(torch.ops.revnet_zero.causal_linear_attention.default, (q, k, v, 16))
    y, x, X, s = grid_inputs((2, 9, 4), torch.float32, [1, -1], g)
    torch.library.opcheck(torch.ops.revnet_zero.bdia_grid_step_.default, (y, x, X, s, 2))
    packed = gs.bdia_grid_step(y, x, X.clone(), s, 2)[1]
    torch.library.opcheck(torch.ops.revnet_zero.bdia_grid_unstep.default, (y, x, X, packed, s, 2))


def test_affine_separate_vjp_matches_the_coupling():
    """One pass against AffineCoupling.separate + combine_vjp (what the engine runs eagerly), float32
    stream with a float32 or bfloat16 sub-function output; x lands in y's memory."""
    from revnet_zero import AffineCoupling
    g = torch.Generator().manual_seed(0)
    c = AffineCoupling(split_dim=-1, scale_init=0.3)
    for h_dtype in (torch.float32, torch.bfloat16):
        y = torch.randn(2, 33, 24, generator=g).to(DEV)
        h = (torch.randn(2, 33, 48, generator=g) * 3).to(DEV, h_dtype)
        dy = torch.randn(2, 33, 24, generator=g).to(DEV)
        x_ref = c.separate(y, h, inplace=False)
        dx_ref, dh_ref = c.combine_vjp(x_ref, h, dy)
        yk, dyk = y.clone(), dy.clone()
        x, dx, dh = K.affine_separate_vjp(yk, h, dyk, 0.3)
        assert x.data_ptr() == yk.data_ptr() and torch.equal(dyk, dy) and dh.dtype == dh_ref.dtype == dx.dtype
        for name, a, b in (("x", x, x_ref), ("dx", dx, dx_ref), ("dh", dh, dh_ref)):
            assert rel(a, b) <= 1e-5, (h_dtype, name, rel(a, b))
    with pytest.raises(ValueError, match=r"h \(2, 33, 40\)"):
        K.affine_separate_vjp(y, h[..., :40], dy, 0.3)


def test_triton_is_optional():
    """``import revnet_zero`` (and the conversion, whose 'auto' grid step needs no kernel) imports no
    Triton; without Triton, revnet_zero.kernels says how to install it."""
    import subprocess
    import sys
    code = ("import sys; import revnet_zero, revnet_zero.conversion; assert 'triton' not in sys.modules, 'triton'; "
            "sys.modules['triton'] = None\n"
            "try:\n    import revnet_zero.kernels\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install revnet-zero[triton]" in out.stdout


def test_triton_affine_coupling_in_the_engine_matches_affine_coupling():
    """The engine's backward through TritonAffineCoupling (the kernel at the engine's call site) against
    AffineCoupling with the same weights: the same loss (forward is shared) and gradients within the
    float32 tolerance above; the kernel did run, once per step and block."""
    from torch import nn

    from revnet_zero import AffineCoupling, ReversibleSequence
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 32)) for _ in range(4)]
    plain = ReversibleSequence([AffineCoupling(nets[0], nets[1], scale_init=0.3),
                                AffineCoupling(nets[2], nets[3], scale_init=0.3)]).to(DEV)
    fused = ReversibleSequence([K.TritonAffineCoupling(nets[0], nets[1], scale_init=0.3),
                                K.TritonAffineCoupling(nets[2], nets[3], scale_init=0.3)]).to(DEV)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1)).to(DEV)
    runs, calls, real = [], [], K.stream.affine_separate_vjp
    K.stream.affine_separate_vjp = lambda *a: (calls.append(1), real(*a))[1]
    try:
        for seq in (plain, fused):
            xi = x.clone().requires_grad_()
            y1, y2 = seq(xi)
            loss = (y1.pow(2) + 0.5 * y2).sum()
            runs.append((loss.detach(), torch.autograd.grad(loss, [xi, *seq.parameters()])))
    finally:
        K.stream.affine_separate_vjp = real
    assert len(calls) == 4
    (loss, grads), (floss, fgrads) = runs
    assert torch.equal(loss, floss)
    assert max(rel(a, b) for a, b in zip(fgrads, grads)) <= 1e-5


def test_liger_rope_matches_apply_rope():
    """Liger-Kernel's rotation of q and k (in place, one kernel) against layers.rope.apply_rope, forward
    and backward, on the projections' [B, S, H, hd] layout, float32: 1e-6 (the same products; Liger
    multiplies and adds in another order)."""
    pytest.importorskip("liger_kernel")
    from revnet_zero.kernels.norm_rope import liger_rope
    from revnet_zero.layers.rope import apply_rope, rope_cos_sin
    g = torch.Generator().manual_seed(0)
    B, S, H, Hkv, hd = 2, 10, 4, 2, 16
    q0 = torch.randn(B, S, H, hd, generator=g).to(DEV).transpose(1, 2)
    k0 = torch.randn(B, S, Hkv, hd, generator=g).to(DEV).transpose(1, 2)
    cos, sin = rope_cos_sin(0, S, hd, 10000.0, torch.device(DEV))
    outs = []
    for rope in ("liger", "torch"):
        q, k = (t.detach().clone().requires_grad_() for t in (q0, k0))
        qi, ki = q * 1, k * 1   # non-leaf, as a projection's output; the Liger kernel writes into them
        if rope == "liger":
            qr, kr = liger_rope(qi, ki, cos, sin)
        else:
            qr, kr = apply_rope(qi, cos, sin), apply_rope(ki, cos, sin)
        dq, dk = torch.autograd.grad((qr * qr.detach()).sum() + 2 * kr.sum(), (q, k))
        outs.append((qr.detach(), kr.detach(), dq, dk))
    for a, b in zip(*outs):
        assert rel(a, b) <= 1e-6


def test_layers_take_their_kernels_per_module():
    from revnet_zero.layers.reversible_attention import SelfAttention
    attn = SelfAttention(d_model=32, num_heads=4)
    attn.kernels = "fast"
    with pytest.raises(ValueError, match=r"kernels must be one of \('torch', 'liger'\), got 'fast'"):
        attn(torch.randn(1, 5, 32))
