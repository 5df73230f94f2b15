"""Random-feature maps for kernel attention, and causal kernel attention built on them.

A shift-invariant or softmax-like kernel ``K(x, y)`` is estimated as ``phi(x) . phi(y)`` with ``m``
random features; attention then becomes ``out_i = sum_{j<=i} K(q_i, k_j) v_j / sum_{j<=i} K(q_i, k_j)``,
computed by ``causal_linear_attention`` in O(S m dv) instead of O(S^2 d).

Kernels (on q, k already scaled by ``hd ** -0.25``, as FAVOR+ does, so ``q . k`` is the softmax logit):

* ``gaussian``: ``K = exp(-|x - y|^2 / 2)``; features ``phi(x) = exp(w . x - |x|^2) / sqrt(m)``,
  ``w ~ N(0, I)`` (positive random features, FAVOR+): POSITIVE, unbiased. Since
  ``exp(-|x-y|^2/2) = exp(x.y) exp(-|x|^2/2) exp(-|y|^2/2)``, this is softmax attention's kernel with
  each key's weight scaled by ``exp(-|k|^2 / 2)`` (queries' factor cancels in the normalisation).
* ``laplacian``: ``K = exp(-|x - y|_1)``; its spectral density is a product of Cauchy densities, so
  ``w ~ Cauchy(0, 1)`` per coordinate and trigonometric features ``[cos(w.x), sin(w.x)] / sqrt(m/2)``:
  NOT positive (the estimated weights and denominator can be negative).
* ``cauchy``: ``K = prod_i 1 / (1 + (x_i - y_i)^2)`` (a rational kernel); its spectral density is a
  product of Laplace densities, so ``w ~ Laplace(0, 1)`` and the same trigonometric features: NOT positive.

The denominator is clamped at ``DENOM_EPS`` from below: with positive features it only guards
underflow; with trigonometric features it also hides a negative estimate, so use enough features.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .linear_attention import causal_linear_attention

KERNELS = ("gaussian", "laplacian", "cauchy")
POSITIVE = {"gaussian": True, "laplacian": False, "cauchy": False}
DENOM_EPS = 1e-6


def check_kernel(kernel, num_features) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"rf_kernel must be one of {KERNELS}, got {kernel!r}")
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"rf_num_features must be an int >= 1, got {num_features!r}")
    if not POSITIVE[kernel] and num_features % 2:
        raise ValueError(f"rf_num_features must be even for the {kernel} kernel (cos and sin features come "
                         f"in pairs), got {num_features}")


def draw_frequencies(kernel: str, num_features: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
    """Frequencies ``[n, dim]`` drawn from the kernel's spectral density (``n = m`` for the Gaussian,
    ``m / 2`` for the trigonometric kernels), float32 on CPU."""
    check_kernel(kernel, num_features)
    if kernel == "gaussian":
        return torch.randn(num_features, dim, generator=generator)
    u = torch.rand(num_features // 2, dim, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    if kernel == "laplacian":   # Cauchy(0, 1) by inverse CDF
        return torch.tan(math.pi * (u - 0.5)).float()
    # Laplace(0, 1) by inverse CDF
    return (-torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs())).float()


def feature_map(x: Tensor, w: Tensor, kernel: str) -> Tensor:
    """``x`` ``[..., d]`` -> features ``[..., m]`` in float32 with ``phi(x) . phi(y) ~ K(x, y)`` (autocast
    off: a bf16 projection would put percent-level errors into the exponentials)."""
    with torch.autocast(x.device.type, enabled=False):
        return _features(x.float(), w.float(), kernel)


def _features(xf: Tensor, w: Tensor, kernel: str) -> Tensor:
    proj = xf @ w.t()
    if kernel == "gaussian":
        return torch.exp(proj - xf.square().sum(-1, keepdim=True)) / math.sqrt(w.shape[0])
    return torch.cat([proj.cos(), proj.sin()], dim=-1) / math.sqrt(w.shape[0])


def exact_kernel(x: Tensor, y: Tensor, kernel: str) -> Tensor:
    """``K(x_i, y_j)`` for ``x`` ``[n, d]``, ``y`` ``[p, d]`` -> ``[n, p]`` (float64, for tests)."""
    d = x.double()[:, None, :] - y.double()[None, :, :]
    if kernel == "gaussian":
        return torch.exp(-d.square().sum(-1) / 2)
    if kernel == "laplacian":
        return torch.exp(-d.abs().sum(-1))
    return (1 / (1 + d.square())).prod(-1)


def query_features(q: Tensor, w: Tensor, kernel: str) -> Tensor:
    """Query features; for the Gaussian each row is divided by its largest feature (a per-query factor,
    which cancels between numerator and denominator) so the exponentials cannot overflow. The factor
    is detached: its gradient is zero in exact arithmetic, and in floats only adds cancelling noise."""
    phi = feature_map(q, w, kernel)
    return phi / phi.detach().amax(dim=-1, keepdim=True) if kernel == "gaussian" else phi


def scaled(t: Tensor) -> Tensor:
    return t * t.shape[-1] ** -0.25


def _expand(t: Tensor, heads: int) -> Tensor:
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def rf_attention(q: Tensor, k: Tensor, v: Tensor, w: Tensor, kernel: str, chunk_size: int = 64) -> Tensor:
    """Causal random-feature attention: q ``[B, H, S, hd]``, k, v ``[B, Hkv, S, hd]`` -> ``[B, H, S, hd]``."""
    H = q.shape[1]
    fq = query_features(scaled(q), w, kernel)
    fk = feature_map(scaled(_expand(k, H)), w, kernel)
    v1 = torch.cat([_expand(v, H).float(), v.new_ones(*v.shape[:1], H, v.shape[2], 1, dtype=torch.float32)], -1)
    out = causal_linear_attention(fq, fk, v1, chunk_size)
    return (out[..., :-1] / out[..., -1:].clamp_min(DENOM_EPS)).to(q.dtype)


def rf_attention_reference(q: Tensor, k: Tensor, v: Tensor, w: Tensor, kernel: str) -> Tensor:
    """The same through the explicit ``[S, S]`` matrix of feature products (float32, for tests)."""
    H, S = q.shape[1], q.shape[2]
    fq = query_features(scaled(q), w, kernel)
    fk = feature_map(scaled(_expand(k, H)), w, kernel)
    a = (fq @ fk.transpose(-1, -2)) * torch.ones(S, S, device=q.device).tril()
    return ((a @ _expand(v, H).float()) / (a.sum(-1, keepdim=True)).clamp_min(DENOM_EPS)).to(q.dtype)


def rf_state(k: Tensor, v: Tensor, w: Tensor, kernel: str, heads: int) -> Tensor:
    """The decoding state after keys/values ``[B, Hkv, S, hd]``: ``sum_j phi(k_j) [v_j, 1]^T`` ``[B, H, m, hd + 1]``."""
    fk = feature_map(scaled(_expand(k, heads)), w, kernel)
    v1 = torch.cat([_expand(v, heads).float(), torch.ones(*fk.shape[:3], 1, device=v.device)], -1)
    with torch.autocast(k.device.type, enabled=False):
        return fk.transpose(-1, -2) @ v1


def rf_decode(q: Tensor, state: Tensor, w: Tensor, kernel: str) -> Tensor:
    """One step: q ``[B, H, T, hd]`` against the state (which already holds these positions' keys)."""
    with torch.autocast(q.device.type, enabled=False):
        out = query_features(scaled(q), w, kernel) @ state
    return (out[..., :-1] / out[..., -1:].clamp_min(DENOM_EPS)).to(q.dtype)
