"""Hierarchical causal attention: exact attention nearby, mean-pooled key/value blocks further back.

For query ``i``, the past ``[0, i]`` is cut into disjoint spans, each seen at one resolution:

* level 0 (exact): keys ``[b_0, i]`` with ``b_0 = floor((i + 1 - w) / r_1) * r_1`` (clamped at 0):
  the last ``w`` to ``w + r_1 - 1`` tokens, starting on an ``r_1`` boundary;
* level ``l = 1 .. L``: the complete blocks of ``r_l`` tokens in ``[b_l, b_{l-1})``, each block's keys
  and values mean-pooled, its score raised by ``log r_l`` (the block stands for ``r_l`` tokens whose
  keys all scored like the mean key); ``b_l = floor((b_{l-1} - w * r_l / r_1) / r_{l+1}) * r_{l+1}``
  (clamped at 0), so level ``l`` covers at least ``w * r_l / r_1`` tokens in about ``w / r_1`` blocks,
  and ``b_L = 0``: the coarsest level covers everything older.

Every past token is covered exactly once (the spans tile ``[0, i]``; ``r_l`` divides ``r_{l+1}``, so
every boundary of a coarser level is one of the finer levels), and a pooled block is used only when
it lies wholly before ``b_{l-1} <= i``: causal at every level. Per query ``O(w + (L - 1) w / r_1 +
S / r_L)`` keys: still quadratic in S through the last level, with the constant ``1 / r_L``.

Pooled keys are the means of the RoPE-rotated keys (positions inside a block blur; NSA learns its
compression instead, which this does not). Keys are laid out ``[K; pooled_1; ...; pooled_L]`` with
``P_l = floor(S / r_l)`` pooled rows per level; ``HierarchySpec.allowed`` gives the mask and the bias
for any (query position, key row) pair, and all paths (chunked SDPA, flex_attention, dense reference,
decoding) use it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .window_attention import dense_masked_attention, flex


@dataclass(frozen=True)
class HierarchySpec:
    """The shape of the hierarchy; validated on creation."""

    local_window: int                     # w: exact keys per query (w to w + r_1 - 1 of them)
    compression_ratios: tuple[int, ...]   # r_1 < r_2 < ...: tokens per pooled block at each level

    def __post_init__(self):
        w, ratios = self.local_window, self.compression_ratios
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"local_window must be an int >= 1, got {w!r}")
        if not isinstance(ratios, tuple) or not ratios or any(
                isinstance(r, bool) or not isinstance(r, int) or r < 2 for r in ratios):
            raise ValueError(f"compression_ratios must be a non-empty tuple of ints >= 2, got {ratios!r}")
        for a, b in zip(ratios, ratios[1:]):
            if b <= a or b % a:
                raise ValueError(f"compression_ratios must increase and each divide the next, got {ratios!r} "
                                 f"({a} then {b})")

    @property
    def levels(self) -> int:
        return len(self.compression_ratios)

    def span(self, level: int) -> int:
        """Tokens level ``level`` (1-based, below the last) covers at least."""
        return self.local_window * self.compression_ratios[level - 1] // self.compression_ratios[0]

    def bounds(self, q_pos: Tensor) -> list[Tensor]:
        """``[b_0, ..., b_L]`` for query positions ``q_pos`` (int64 tensor)."""
        r = self.compression_ratios
        b = [_floor_to(q_pos + 1 - self.local_window, r[0])]
        for lvl in range(1, self.levels):
            b.append(_floor_to(b[-1] - self.span(lvl), r[lvl]))
        return [*b, torch.zeros_like(q_pos)]

    def pooled_counts(self, S: int) -> list[int]:
        return [S // r for r in self.compression_ratios]

    def allowed(self, q_pos: Tensor, row: Tensor, S: int) -> tuple[Tensor, Tensor]:
        """Mask (True = attend) and score bias for query positions ``q_pos`` against rows ``row`` of
        ``[K; pooled_1; ...]`` with ``S`` raw keys (broadcast shapes; int64)."""
        b = self.bounds(q_pos)
        mask = (row < S) & (row >= b[0]) & (row <= q_pos)
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        start = S
        for lvl, (r, n) in enumerate(zip(self.compression_ratios, self.pooled_counts(S)), start=1):
            m = row - start
            inside = (m >= 0) & (m < n)
            ok = inside & (m * r >= b[lvl]) & ((m + 1) * r <= b[lvl - 1])
            mask = mask | ok
            bias = torch.where(inside, math.log(r), bias)
            start += n
        return mask, bias


def _floor_to(x: Tensor, r: int) -> Tensor:
    return (torch.div(x, r, rounding_mode="floor") * r).clamp_min(0)


def pool(t: Tensor, r: int) -> Tensor:
    """Means of complete blocks of ``r`` positions: ``[B, H, S, d]`` -> ``[B, H, S // r, d]``."""
    B, H, S, d = t.shape
    n = S // r
    return t[:, :, :n * r].reshape(B, H, n, r, d).mean(dim=3)


def extended_kv(spec: HierarchySpec, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``[K; pooled_1; ...; pooled_L]`` and the same for V: ``[B, Hkv, S + sum P_l, hd]``."""
    ks = [k, *(pool(k, r) for r in spec.compression_ratios)]
    vs = [v, *(pool(v, r) for r in spec.compression_ratios)]
    return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


def _bias(spec: HierarchySpec, q_pos: Tensor, rows: Tensor, S: int) -> Tensor:
    mask, bias = spec.allowed(q_pos[:, None], rows[None, :], S)
    return bias.masked_fill(~mask, -math.inf)


def hierarchical_chunked(spec: HierarchySpec, q: Tensor, k: Tensor, v: Tensor,
                         chunk_size: int | None = None) -> Tensor:
    """Plain path: queries in chunks of ``chunk_size`` (default ``local_window`` clamped to [64, 2048])
    through SDPA against the rows the chunk can see (a slice of raw keys and, per level, the slice of
    pooled blocks between its bounds), with a float bias mask."""
    S = q.shape[2]
    ke, ve = extended_kv(spec, k, v)
    C = chunk_size or min(max(spec.local_window, 64), 2048)
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    outs = []
    for s in range(0, S, C):
        e = min(s + C, S)
        spans = _visible_rows(spec, s, e, S)
        # slices, not a gather by rows: their backward is a copy, a gather's a scatter-add
        rows = torch.cat([torch.arange(a, b, device=q.device) for a, b in spans])
        bias = _bias(spec, torch.arange(s, e, device=q.device), rows, S).to(q.dtype)
        ks = torch.cat([ke[:, :, a:b] for a, b in spans], dim=2)
        vs = torch.cat([ve[:, :, a:b] for a, b in spans], dim=2)
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], ks, vs, attn_mask=bias, **gqa))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _visible_rows(spec: HierarchySpec, s: int, e: int, S: int) -> list[tuple[int, int]]:
    """Row ranges of ``[K; pooled_1; ...]`` that any query in ``[s, e)`` may see: bounds grow with the
    query position, so the first query's lower bounds and the last one's upper bounds enclose them."""
    first, last = spec.bounds(torch.tensor(s)), spec.bounds(torch.tensor(e - 1))
    spans, start = [(int(first[0]), e)], S
    for lvl, (r, n) in enumerate(zip(spec.compression_ratios, spec.pooled_counts(S)), start=1):
        lo, hi = min(int(first[lvl]) // r, n), min(int(last[lvl - 1]) // r, n)
        if hi > lo:
            spans.append((start + lo, start + hi))
        start += n
    return spans


def hierarchical_reference(spec: HierarchySpec, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Explicit ``[S, S + sum P_l]`` masked softmax in float32 (for tests)."""
    S = q.shape[2]
    ke, ve = extended_kv(spec, k, v)
    bias = _bias(spec, torch.arange(S, device=q.device), torch.arange(ke.shape[2], device=q.device), S)
    return dense_masked_attention(q, ke, ve, bias)


@functools.lru_cache(maxsize=16)
def _block_mask(spec: HierarchySpec, S: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return spec.allowed(q_idx, kv_idx, S)[0]
    total = S + sum(spec.pooled_counts(S))
    return create_block_mask(mask_mod, None, None, S, total, device=device, _compile=device.startswith("cuda"))


def hierarchical_flex(spec: HierarchySpec, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One ``flex_attention`` call over ``[K; pooled K]`` with the block mask and a log(ratio) score bias."""
    S = q.shape[2]
    ke, ve = extended_kv(spec, k, v)
    starts, start = [], S
    for n in spec.pooled_counts(S):
        start += n
        starts.append(start)
    logs = [math.log(r) for r in spec.compression_ratios]

    def score_mod(score, b, h, q_idx, kv_idx):
        bias = torch.zeros_like(score)
        for end, lg in zip(reversed(starts), reversed(logs)):   # finest level last: it wins where rows < end
            bias = torch.where(kv_idx < end, lg, bias)
        return score + torch.where(kv_idx < S, 0.0, bias)
    return flex(q, ke, ve, _block_mask(spec, S, str(q.device)), score_mod=score_mod)
