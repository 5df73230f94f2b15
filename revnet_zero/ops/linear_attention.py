"""Causal linear attention by chunked prefix sums (plain PyTorch), and its naive S x S reference.

``out_i = sum_{j <= i} (q_i . k_j) v_j`` for feature-mapped queries and keys. The sequence is cut into
chunks of ``C`` positions: inside a chunk the sum is a masked ``[C, C]`` product; across chunks it is
the running state ``sum_j k_j v_j^T`` (``[m, dv]``), an exclusive prefix sum over chunks. Cost
``O(S * C * (m + dv) + S * m * dv)``, memory ``O(S / C * m * dv)`` for the chunk states. Everything
runs in float32, whatever the inputs' dtype (sums of many small products lose too much in bf16).
Normalisation (dividing by ``q_i . sum_{j <= i} k_j``) is the caller's: append a ones column to v.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"causal_linear_attention takes q, k [B, H, S, m] and v [B, H, S, dv] with equal "
                         f"B, H, S; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int = 64) -> Tensor:
    """q, k ``[B, H, S, m]`` (feature-mapped), v ``[B, H, S, dv]`` -> ``[B, H, S, dv]`` in v's dtype.

    ``out_i = sum_{j <= i} (q_i . k_j) v_j``, computed in float32 by chunked prefix sums (state
    ``[m, dv]`` per chunk boundary in float32). S need not be a multiple of ``chunk_size`` (the tail
    is zero-padded, which adds nothing to any sum).

    Example::

        q, k = torch.rand(1, 2, 37, 8), torch.rand(1, 2, 37, 8)
        out = causal_linear_attention(q, k, torch.randn(1, 2, 37, 5), chunk_size=16)   # [1, 2, 37, 5]
    """
    _check(q, k, v)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    with torch.autocast(q.device.type, enabled=False):   # float32 sums even inside a bf16 autocast region
        return _chunked(q, k, v, chunk_size)


def _chunked(q: Tensor, k: Tensor, v: Tensor, chunk_size: int) -> Tensor:
    B, H, S, _ = q.shape
    dv = v.shape[-1]
    C = min(chunk_size, S)
    N = -(-S // C)
    pad = N * C - S
    qf, kf, vf = (F.pad(t.float(), (0, 0, 0, pad)).view(B, H, N, C, t.shape[-1]) for t in (q, k, v))
    # across chunks: state before chunk n = sum of k^T v over chunks < n (exclusive prefix sum)
    kv = kf.transpose(-1, -2) @ vf                                        # (B, H, N, m, dv)
    # (cumsum then minus kv would let chunk n's own k, v into its state through rounding)
    state = F.pad(kv[:, :, :-1].cumsum(dim=2), (0, 0, 0, 0, 1, 0))
    inter = qf @ state                                                    # (B, H, N, C, dv)
    # inside a chunk: causal [C, C] scores
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = (qf @ kf.transpose(-1, -2)).masked_fill(~causal, 0.0)       # (B, H, N, C, C)
    out = inter + scores @ vf
    return out.reshape(B, H, N * C, dv)[:, :, :S].to(v.dtype)


def causal_linear_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The same sum through an explicit ``[S, S]`` lower-triangular score matrix (float32): for tests."""
    _check(q, k, v)
    S = q.shape[2]
    scores = q.float() @ k.float().transpose(-1, -2)                     # (B, H, S, S)
    mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    return (scores.masked_fill(~mask, 0.0) @ v.float()).to(v.dtype)


def linear_attention_state(k: Tensor, v: Tensor) -> Tensor:
    """``sum_j k_j v_j^T`` over all positions: ``[B, H, S, m]``, ``[B, H, S, dv]`` -> ``[B, H, m, dv]`` float32
    (the decoding state after a prompt)."""
    return k.float().transpose(-1, -2) @ v.float()
