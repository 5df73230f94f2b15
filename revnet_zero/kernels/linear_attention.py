"""Causal chunked linear attention on non-negative feature maps (random-Fourier-feature attention) in Triton.

``out_i = Σ_{j≤i} (q_i · k_j) v_j`` for ``q, k [B, H, S, m]`` (non-negative features, so no
normaliser is needed here) and ``v [B, H, S, dv]``. One program per (batch, head, block of ``dv``)
walks the sequence a chunk at a time: within a chunk the masked ``C x C`` scores, across chunks the
running float32 state ``Σ k_j v_jᵀ [m, dv]``, so memory is linear in ``S``.

The backward is the same kernel three times: with ``do`` the output's gradient,
``dq_i = Σ_{j≤i} (do_i · v_j) k_j`` (causal), ``dk_j = Σ_{i≥j} (v_j · do_i) q_i`` and
``dv_j = Σ_{i≥j} (k_j · q_i) do_i`` (anti-causal: the chunks walked from the end).

Products run in float32 (``input_precision='ieee'``: no TF32), the state is float32, each result is
rounded once to its tensor's dtype. Offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor, nn


@triton.jit
def _chunked_kernel(a_ptr, b_ptr, c_ptr, o_ptr, H, S, DA, DC,
                    sa_b, sa_h, sa_s, sb_b, sb_h, sb_s, sc_b, sc_h, sc_s, so_b, so_h, so_s,
                    CHUNK: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, REVERSE: tl.constexpr):
    """``o_i = Σ_j (a_i · b_j) c_j`` over ``j ≤ i`` (``j ≥ i`` when REVERSE); last dims have stride 1."""
    bh, pc = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bi, hi = bh // H, bh % H
    a_ptr += bi * sa_b + hi * sa_h
    b_ptr += bi * sb_b + hi * sb_h
    c_ptr += bi * sc_b + hi * sc_h
    o_ptr += bi * so_b + hi * so_h
    da = tl.arange(0, BLOCK_A)
    dc = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.arange(0, CHUNK).to(tl.int64)   # so that pos * stride is int64 (S itself is < 2^31)
    keep = (rows[None, :] >= rows[:, None]) if REVERSE else (rows[None, :] <= rows[:, None])
    state = tl.zeros([BLOCK_A, BLOCK_C], dtype=tl.float32)
    chunks = tl.cdiv(S, CHUNK)
    for n in range(0, chunks):
        start = ((chunks - 1 - n) if REVERSE else n) * CHUNK
        pos = start + rows
        ma = (pos[:, None] < S) & (da[None, :] < DA)
        mc = (pos[:, None] < S) & (dc[None, :] < DC)
        a = tl.load(a_ptr + pos[:, None] * sa_s + da[None, :], mask=ma, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + pos[:, None] * sb_s + da[None, :], mask=ma, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + pos[:, None] * sc_s + dc[None, :], mask=mc, other=0.0).to(tl.float32)
        scores = tl.dot(a, tl.trans(b), input_precision="ieee")
        scores = tl.where(keep, scores, 0.0)
        out = tl.dot(scores, c, input_precision="ieee") + tl.dot(a, state, input_precision="ieee")
        tl.store(o_ptr + pos[:, None] * so_s + dc[None, :], out.to(o_ptr.dtype.element_ty), mask=mc)
        state += tl.dot(tl.trans(b), c, input_precision="ieee")


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def _launch(a: Tensor, b: Tensor, c: Tensor, out_dtype: torch.dtype, chunk: int, reverse: bool) -> Tensor:
    a, b, c = (t if t.stride(-1) == 1 else t.contiguous() for t in (a, b, c))
    B, H, S, DA = a.shape
    DC = c.shape[-1]
    out = torch.empty(B, H, S, DC, dtype=out_dtype, device=c.device)
    if out.numel() == 0:
        return out
    block_c = min(_pow2(DC), 64)
    grid = (B * H, triton.cdiv(DC, block_c))
    _chunked_kernel[grid](a, b, c, out, H, S, DA, DC, *a.stride()[:3], *b.stride()[:3], *c.stride()[:3],
                          *out.stride()[:3], CHUNK=chunk, BLOCK_A=_pow2(DA), BLOCK_C=block_c, REVERSE=reverse)
    return out


@torch.library.custom_op("revnet_zero::causal_linear_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, chunk_size: int) -> Tensor:
    return _launch(q, k, v, v.dtype, chunk_size, reverse=False)


@_attention_op.register_fake
def _(q, k, v, chunk_size):
    return v.new_empty(*q.shape[:3], v.shape[-1])


@torch.library.custom_op("revnet_zero::causal_linear_attention_backward", mutates_args=())
def _attention_backward_op(q: Tensor, k: Tensor, v: Tensor, do: Tensor,
                           chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    return (_launch(do, v, k, q.dtype, chunk_size, reverse=False),    # dq_i = Σ_{j≤i} (do_i·v_j) k_j
            _launch(v, do, q, k.dtype, chunk_size, reverse=True),     # dk_j = Σ_{i≥j} (v_j·do_i) q_i
            _launch(k, q, do, v.dtype, chunk_size, reverse=True))     # dv_j = Σ_{i≥j} (k_j·q_i) do_i


@_attention_backward_op.register_fake
def _(q, k, v, do, chunk_size):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, chunk = inputs
    ctx.save_for_backward(q, k, v)
    ctx.chunk = chunk


def _backward(ctx, do):
    q, k, v = ctx.saved_tensors
    return (*_attention_backward_op(q, k, v, do, ctx.chunk), None)


_attention_op.register_autograd(_backward, setup_context=_setup)


def _check(q: Tensor, k: Tensor, v: Tensor, chunk_size: int) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"causal_linear_attention needs q, k [B, H, S, m] and v [B, H, S, dv]; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in (q, k, v)):
        raise TypeError(f"causal_linear_attention takes float32, bfloat16 or float16; got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if not (isinstance(chunk_size, int) and chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0):
        raise ValueError(f"chunk_size must be a power of two >= 16 (a Triton block), got {chunk_size!r}")


def causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int = 64) -> Tensor:
    """``out_i = Σ_{j≤i} (q_i · k_j) v_j`` ``[B, H, S, dv]`` in ``v``'s dtype, by the Triton kernel
    (float32 products and state). ``q, k [B, H, S, m]``: non-negative feature maps.

    Example::

        out = causal_linear_attention(q.relu(), k.relu(), v, chunk_size=64)
    """
    _check(q, k, v, chunk_size)
    return _attention_op(q, k, v, chunk_size)


def naive_causal_linear_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The reference: the masked ``S x S`` scores in float32, times ``v``; ``[B, H, S, dv]`` in ``v``'s dtype."""
    scores = q.float() @ k.float().transpose(-1, -2)
    S = q.shape[-2]
    mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    return (scores.masked_fill(~mask, 0.0) @ v.float()).to(v.dtype)


class TritonRFAttention(nn.Module):
    """Causal random-Fourier-feature (linear) attention on feature maps ``q, k [B, H, S, m]`` and values
    ``v [B, H, S, dv]`` -> ``[B, H, S, dv]``: ``causal_linear_attention`` by the Triton kernel where it
    runs (``runs_on``: CUDA, or the CPU interpreter), else by ``naive_causal_linear_attention`` (the
    same function in float32; it holds ``S x S`` scores, so only for short sequences).

    Example::

        attn = TritonRFAttention(chunk_size=64)
        out = attn(q.relu(), k.relu(), v)
    """

    def __init__(self, chunk_size: int = 64):
        super().__init__()
        if not (isinstance(chunk_size, int) and chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0):
            raise ValueError(f"chunk_size must be a power of two >= 16 (a Triton block), got {chunk_size!r}")
        self.chunk_size = chunk_size   # positions per chunk: the masked scores are chunk x chunk

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        from . import runs_on
        if runs_on(q):
            return causal_linear_attention(q, k, v, self.chunk_size)
        _check(q, k, v, self.chunk_size)
        return naive_causal_linear_attention(q, k, v)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"
