"""Sliding-window causal attention: exact softmax attention of each query over its last ``window`` keys.

Query ``i`` attends to keys ``j`` with ``i - window < j <= i``. Cost ``O(S * window)``, never an
``S x S`` mask:

* ``sliding_window_chunked``: plain PyTorch for CPU training and any device: queries in chunks of
  ``C``, each chunk through SDPA against the ``C + window - 1`` keys it can see with a ``[C, C + w - 1]``
  boolean mask. Differentiable by autograd.
* ``sliding_window_flex``: ``flex_attention`` with a block mask (blocks wholly outside the window are
  skipped by the kernel); compiled on CUDA. In torch 2.13 its backward is refused on CPU, its forward runs.
* ``sliding_window_reference``: the explicit ``[S, S]`` masked softmax, in float32, for tests.

All take q ``[B, H, S, hd]``, k, v ``[B, Hkv, S, hd]`` (``H`` a multiple of ``Hkv``: GQA) and return
``[B, H, S, hd]``.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor


def check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"attention_window must be an int >= 1, got {window!r}")
    return window


def window_mask(q_pos: Tensor, k_pos: Tensor, window: int) -> Tensor:
    """True where query position ``q_pos`` may see key position ``k_pos`` (broadcast)."""
    return (k_pos <= q_pos) & (q_pos - k_pos < window)


def sliding_window_chunked(q: Tensor, k: Tensor, v: Tensor, window: int, chunk_size: int | None = None,
                           q_start: int = 0) -> Tensor:
    """Exact sliding-window attention by query chunks through SDPA.

    ``q_start``: absolute position of ``q``'s first row, when ``k``, ``v`` hold positions
    ``[q_start + S_q - S_k, q_start + S_q)`` (the last ``S_k`` keys, as a decoding cache does).
    ``chunk_size`` (default ``window`` clamped to [64, 2048]): queries per SDPA call; the result does
    not depend on it.
    """
    check_window(window)
    Sq, Sk = q.shape[2], k.shape[2]
    k0 = q_start + Sq - Sk                          # absolute position of k's first row
    C = chunk_size or min(max(window, 64), 2048)
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    outs = []
    for s in range(0, Sq, C):
        e = min(s + C, Sq)
        lo = max(q_start + s - window + 1, k0)      # first key any query of the chunk can see
        qp = torch.arange(q_start + s, q_start + e, device=q.device)[:, None]
        kp = torch.arange(lo, q_start + e, device=q.device)[None, :]
        ks, vs = k[:, :, lo - k0:q_start + e - k0], v[:, :, lo - k0:q_start + e - k0]
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], ks, vs, attn_mask=window_mask(qp, kp, window),
                                                   **gqa))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def sliding_window_reference(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Explicit ``[S, S]`` masked softmax in float32 (for tests), returned in q's dtype."""
    S = q.shape[2]
    pos = torch.arange(S, device=q.device)
    mask = window_mask(pos[:, None], pos[None, :], window)
    return dense_masked_attention(q, k, v, torch.zeros(S, S, device=q.device).masked_fill(~mask, -math.inf))


def dense_masked_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hd) + bias) v with explicit scores in float32 (float64 for float64 inputs);
    bias ``[Sq, Sk]`` (-inf = masked)."""
    g = q.shape[1] // k.shape[1]
    dt = torch.promote_types(q.dtype, torch.float32)
    k, v = k.repeat_interleave(g, dim=1).to(dt), v.repeat_interleave(g, dim=1).to(dt)
    scores = q.to(dt) @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias.to(dt)
    return (scores.softmax(dim=-1) @ v).to(q.dtype)


@functools.cache
def compiled_flex_attention():
    """``flex_attention`` compiled once per process (eager elsewhere: it runs, slowly, on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)


def flex(q: Tensor, k: Tensor, v: Tensor, block_mask, score_mod=None) -> Tensor:
    """flex_attention, compiled on CUDA, eager on CPU (forward only there)."""
    from torch.nn.attention.flex_attention import flex_attention
    fn = compiled_flex_attention() if q.is_cuda else flex_attention
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


@functools.lru_cache(maxsize=16)
def _window_block_mask(S: int, window: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return window_mask(q_idx, kv_idx, window)
    return create_block_mask(mask_mod, None, None, S, S, device=device, _compile=device.startswith("cuda"))


def sliding_window_flex(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Sliding-window attention by ``flex_attention`` with a block mask (cached per length and device)."""
    check_window(window)
    return flex(q, k, v, _window_block_mask(q.shape[2], window, str(q.device)))
