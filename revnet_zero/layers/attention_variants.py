"""Causal attention variants that cost less than exact attention at long context.

Each is a ``SelfAttention`` (same norm, projections, RoPE, output projection; ``[B, S, D] -> [B, S, D]``)
whose attention step differs:

* ``SlidingWindowAttention``: exact softmax over the last ``window`` tokens;
* ``HierarchicalAttention``: exact over a local window, mean-pooled blocks further back
  (``ops/hierarchical_attention.py``);
* ``RationalFourierAttention``: kernel attention with random features, linear in S (``ops/random_features.py``).

All are causal only and take no padding mask. Decoding: ``new_cache(max_len)`` gives a fixed-size
cache (the last w keys; the pooled hierarchy; the random-feature state); a plain ``KVCache`` (all keys,
as Hugging Face's ``DynamicCache`` gives) works too and gives the same outputs. The kept-attention
policies (``store_attention`` / ``offload_attention``) keep an SDPA kernel's output and logsumexp; these
variants do not run one kernel call over the sequence, so those policies are refused with a ValueError.
"""
from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import kept_attention
from ..ops import random_features as rf
from ..ops.hierarchical_attention import HierarchySpec, hierarchical_chunked, hierarchical_flex, pool
from ..ops.window_attention import check_window, sliding_window_chunked, sliding_window_flex
from .reversible_attention import SelfAttention

BACKENDS = ("auto", "flex", "chunked")


class _VariantAttention(SelfAttention, metaclass=abc.ABCMeta):
    """What the variants share: causal only, cache dispatch, refusal of kept-attention policies."""

    name = "variant"

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None, **kwargs):
        if not kwargs.pop("causal", True):
            raise ValueError(f"{type(self).__name__} is causal only (causal=False given)")
        super().__init__(d_model, num_heads, num_kv_heads, causal=True, **kwargs)
        if self.attention_dropout:
            raise ValueError(f"{type(self).__name__} has no attention dropout; got attention_dropout="
                             f"{self.attention_dropout}")

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, cache=None, **kwargs) -> Tensor:
        B, S, D = x.shape
        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__} takes no attention_mask (causal: right-pad the batch "
                             "and set the padded labels to -100)")
        start = cache.length if cache is not None else 0
        if cache is not None and start > 0 and S > 1:
            raise ValueError(f"the cache takes a prompt then one token at a time; got {S} tokens at position {start}")
        q, k, v = self.project(x, start)
        if cache is None:
            if kept_attention.keeping():
                raise ValueError(f"the store_attention/offload_attention policies keep one SDPA kernel's output "
                                 f"and logsumexp; {self.name} attention has none to keep: use the 'recompute' "
                                 "(or 'store') policy")
            y = self.attend(q, k, v)
        elif hasattr(cache, "attend"):
            y = cache.attend(self, q, k, v)
        else:   # a cache of all keys and values (KVCache, Hugging Face's DynamicCache)
            k, v = cache.update(k, v)
            y = self.attend_history(q, k, v, start)
        return self.drop(self.wo(y.transpose(1, 2).reshape(B, S, D)))

    @abc.abstractmethod
    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Training path: q ``[B, H, S, hd]``, k, v ``[B, Hkv, S, hd]`` -> ``[B, H, S, hd]``."""
        ...

    @abc.abstractmethod
    def attend_history(self, q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
        """Queries at positions ``start ..`` against all keys ``0 .. start + T - 1``."""
        ...


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


class SlidingWindowAttention(_VariantAttention):
    """Exact causal softmax attention over the last ``window`` tokens (query i sees ``(i - window, i]``).

    ``backend``: ``'auto'`` = flex_attention with a block mask on CUDA, chunked SDPA elsewhere;
    ``'flex'`` / ``'chunked'`` force one. Cost per token O(window); exact attention when S <= window.

    Example::

        attn = SlidingWindowAttention(d_model=96, num_heads=4, window=16)
        y = attn(torch.randn(2, 41, 96))            # [2, 41, 96]
    """

    name = "sliding-window"

    def __init__(self, d_model: int, num_heads: int, window: int = 4096, num_kv_heads: int | None = None,
                 backend: str = "auto", **kwargs):
        super().__init__(d_model, num_heads, num_kv_heads, **kwargs)
        self.window, self.backend = check_window(window), _check_backend(backend)

    def attend(self, q, k, v):
        if self.backend == "flex" or (self.backend == "auto" and q.is_cuda):
            return sliding_window_flex(q, k, v, self.window)
        return sliding_window_chunked(q, k, v, self.window)

    def attend_history(self, q, k, v, start):
        return sliding_window_chunked(q, k, v, self.window, q_start=start)

    def new_cache(self, max_len: int) -> WindowCache:
        return WindowCache(self.window)


class WindowCache:
    """The last ``window`` keys and values ``[B, Hkv, <= window, hd]``: a fixed-size decoding cache."""

    def __init__(self, window: int):
        self.window, self.length = window, 0
        self.k = self.v = None

    def attend(self, attn: SlidingWindowAttention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.length == 0:
            y = sliding_window_chunked(q, k, v, self.window)
            self.k, self.v = k[:, :, -self.window:], v[:, :, -self.window:]
        else:   # one new token: it sees exactly the cached window
            self.k = torch.cat([self.k, k], dim=2)[:, :, -self.window:]
            self.v = torch.cat([self.v, v], dim=2)[:, :, -self.window:]
            y = F.scaled_dot_product_attention(q, self.k, self.v, enable_gqa=k.shape[1] != q.shape[1])
        self.length += q.shape[2]
        return y


class HierarchicalAttention(_VariantAttention):
    """Exact attention over a local window plus mean-pooled key/value blocks at coarser levels for older
    positions, each past token covered once (see ``revnet_zero.ops.hierarchical_attention``).

    ``local_window``: w; ``compression_ratios``: tokens per pooled block at each level, increasing, each
    dividing the next (``num_levels`` must equal their count). ``backend`` as for ``SlidingWindowAttention``.

    Example::

        attn = HierarchicalAttention(d_model=96, num_heads=4, local_window=8, compression_ratios=(2, 8))
        y = attn(torch.randn(2, 41, 96))            # [2, 41, 96]
    """

    name = "hierarchical"

    def __init__(self, d_model: int, num_heads: int, num_levels: int | None = None,
                 compression_ratios: tuple[int, ...] = (4, 16, 64), local_window: int = 1024,
                 num_kv_heads: int | None = None, backend: str = "auto", **kwargs):
        super().__init__(d_model, num_heads, num_kv_heads, **kwargs)
        ratios = tuple(compression_ratios) if isinstance(compression_ratios, list) else compression_ratios
        self.spec = HierarchySpec(local_window, ratios)
        if num_levels is not None and num_levels != self.spec.levels:
            raise ValueError(f"num_levels={num_levels} must equal the number of compression_ratios {ratios!r}")
        self.backend = _check_backend(backend)

    def attend(self, q, k, v):
        if self.backend == "flex" or (self.backend == "auto" and q.is_cuda):
            return hierarchical_flex(self.spec, q, k, v)
        return hierarchical_chunked(self.spec, q, k, v)

    def attend_history(self, q, k, v, start):
        if start == 0:
            return hierarchical_chunked(self.spec, q, k, v)
        return _hierarchy_step(self.spec, q, k, v, torch.arange(k.shape[2], device=k.device),
                               [pool(k, r) for r in self.spec.compression_ratios],
                               [pool(v, r) for r in self.spec.compression_ratios])

    def new_cache(self, max_len: int) -> HierarchyCache:
        return HierarchyCache(self.spec)


def _hierarchy_step(spec: HierarchySpec, q: Tensor, k_raw: Tensor, v_raw: Tensor, raw_pos: Tensor,
                    pk: list[Tensor], pv: list[Tensor]) -> Tensor:
    """One new query (the last position) against raw keys at positions ``raw_pos`` and complete pooled
    blocks ``pk[l]`` ``[B, Hkv, floor(S / r_l), hd]``."""
    S = int(raw_pos[-1]) + 1
    n = sum(p.shape[2] for p in pk)
    rows = torch.cat([raw_pos, torch.arange(S, S + n, device=q.device)])
    mask, bias = spec.allowed(torch.tensor([[S - 1]], device=q.device), rows[None, :], S)   # (1, rows)
    bias = bias.masked_fill(~mask, float("-inf")).to(q.dtype)
    ks, vs = torch.cat([k_raw, *pk], dim=2), torch.cat([v_raw, *pv], dim=2)
    return F.scaled_dot_product_attention(q, ks, vs, attn_mask=bias, enable_gqa=ks.shape[1] != q.shape[1])


class HierarchyCache:
    """Fixed-size raw window (the last ``w + r_1`` keys/values), the complete pooled blocks of every level
    and each level's running sum of its incomplete block: O(w + S / r_1) memory."""

    def __init__(self, spec: HierarchySpec):
        self.spec, self.length = spec, 0
        self.keep = spec.local_window + spec.compression_ratios[0]

    def attend(self, attn: HierarchicalAttention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        r = self.spec.compression_ratios
        if self.length == 0:
            y = hierarchical_chunked(self.spec, q, k, v)
            S = k.shape[2]
            self.k, self.v = k[:, :, -self.keep:], v[:, :, -self.keep:]
            self.pk, self.pv = [pool(k, x) for x in r], [pool(v, x) for x in r]
            self.sk = [k[:, :, S // x * x:].sum(2, keepdim=True) for x in r]
            self.sv = [v[:, :, S // x * x:].sum(2, keepdim=True) for x in r]
            self.length = S
            return y
        self.length += 1
        self.k = torch.cat([self.k, k], dim=2)[:, :, -self.keep:]
        self.v = torch.cat([self.v, v], dim=2)[:, :, -self.keep:]
        for i, x in enumerate(r):
            self.sk[i], self.sv[i] = self.sk[i] + k, self.sv[i] + v
            if self.length % x == 0:   # block complete: its mean joins the level
                self.pk[i] = torch.cat([self.pk[i], self.sk[i] / x], dim=2)
                self.pv[i] = torch.cat([self.pv[i], self.sv[i] / x], dim=2)
                self.sk[i], self.sv[i] = torch.zeros_like(k), torch.zeros_like(v)
        pos = torch.arange(self.length - self.k.shape[2], self.length, device=q.device)
        return _hierarchy_step(self.spec, q, self.k, self.v, pos, self.pk, self.pv)


class RationalFourierAttention(_VariantAttention):
    """Random-feature kernel attention, causal and linear in S (``revnet_zero.ops.random_features``).

    ``kernel``: ``'gaussian'`` (positive random features, FAVOR+), ``'laplacian'`` (Cauchy frequencies)
    or ``'cauchy'`` (Laplace frequencies), the last two with cos/sin features (not positive).
    ``num_fourier_features``: m. ``learnable_features=False``: the frequencies ``[m or m/2, hd]`` are
    drawn once from ``seed`` and kept as a buffer (saved with the weights, never redrawn);
    ``True``: they start from that draw and are trained (a learned feature map, no longer a sample of
    the kernel's spectral density). Decoding keeps a fixed-size state ``[B, H, m, hd + 1]``.

    Example::

        attn = RationalFourierAttention(d_model=96, num_heads=4, num_fourier_features=32, kernel="cauchy")
        y = attn(torch.randn(2, 41, 96))            # [2, 41, 96]
    """

    name = "random-feature"

    def __init__(self, d_model: int, num_heads: int, num_fourier_features: int = 64, kernel: str = "gaussian",
                 learnable_features: bool = False, num_kv_heads: int | None = None, chunk_size: int = 64,
                 seed: int = 0, **kwargs):
        super().__init__(d_model, num_heads, num_kv_heads, **kwargs)
        rf.check_kernel(kernel, num_fourier_features)
        if not isinstance(learnable_features, bool):
            raise TypeError(f"learnable_features must be a bool, got {learnable_features!r}")
        self.kernel, self.chunk_size = kernel, chunk_size
        w = rf.draw_frequencies(kernel, num_fourier_features, self.head_dim, torch.Generator().manual_seed(seed))
        if learnable_features:
            self.frequencies = nn.Parameter(w)
        else:
            self.register_buffer("frequencies", w)

    def attend(self, q, k, v):
        return rf.rf_attention(q, k, v, self.frequencies, self.kernel, self.chunk_size)

    def attend_history(self, q, k, v, start):
        if start == 0:
            return self.attend(q, k, v)
        return rf.rf_decode(q, rf.rf_state(k, v, self.frequencies, self.kernel, q.shape[1]),
                            self.frequencies, self.kernel)

    def new_cache(self, max_len: int) -> FeatureStateCache:
        return FeatureStateCache()


class FeatureStateCache:
    """The running sum ``sum_j phi(k_j) [v_j, 1]^T`` ``[B, H, m, hd + 1]`` (float32): fixed size."""

    def __init__(self):
        self.length, self.state = 0, None

    def attend(self, attn: RationalFourierAttention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        w, kernel = attn.frequencies, attn.kernel
        add = rf.rf_state(k, v, w, kernel, q.shape[1])
        y = attn.attend(q, k, v) if self.length == 0 else None
        self.state = add if self.state is None else self.state + add
        self.length += q.shape[2]
        return y if y is not None else rf.rf_decode(q, self.state, w, kernel)
