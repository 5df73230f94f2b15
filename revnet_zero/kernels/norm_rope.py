"""RMSNorm and rotary embedding by Liger-Kernel's Triton kernels, beside this library's own.

Liger-Kernel (``pip install liger-kernel``) has both ops; they are used, not copied. A norm fused with
the rotation is not possible in these layers: a projection sits between them. Selected per attention
or FFN module (``module.kernels = 'liger'``, see ``revnet_zero.layers.rope.norm_rope``):

* ``liger_rms_norm_cast``: Liger's RMSNorm (``casting_mode='llama'``: float32 statistics, keeps the
  input and ``1/rms``), then the cast to the matmul dtype; reference ``ops.norm.rms_norm_cast``.
* ``liger_rope``: Liger's rotation of q and k in one kernel, forward and backward, **in place** in q's
  and k's memory (the projections' outputs, which nothing else reads); reference
  ``layers.rope.apply_rope`` applied to each. The tables are the half-width ``[S, head_dim / 2]`` ones
  of ``rope_cos_sin`` (Liger's ``rotary_dim`` form), so no full-width copy is made.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _liger():
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
    except ImportError as e:
        raise ImportError("kernels='liger' needs Liger-Kernel: pip install liger-kernel") from e
    return LigerRMSNormFunction, LigerRopeFunction


def liger_rms_norm_cast(x: Tensor, weight: Tensor, eps: float | None, dtype: torch.dtype) -> Tensor:
    """``x / rms(x) * weight`` over the last dim by Liger's kernel, returned in ``dtype`` (``eps=None``:
    ``x``'s machine epsilon, as ``nn.RMSNorm``)."""
    norm, _ = _liger()
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if x.shape[-1:] != weight.shape:
        raise ValueError(f"liger_rms_norm_cast: weight {tuple(weight.shape)} must match the last dim of x "
                         f"{tuple(x.shape)}")
    return norm.apply(x, weight.to(x.dtype), eps, 0.0, "llama", False).to(dtype)


def liger_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """``q [B, H, S, hd]`` and ``k [B, Hkv, S, hd]`` rotated by ``cos``/``sin`` ``[S, hd / 2]`` (float32,
    cast to q's dtype), in place (see the module docstring)."""
    _, rope = _liger()
    hd = q.shape[-1]
    if cos.shape != (q.shape[2], hd // 2) or k.shape[-1] != hd:
        raise ValueError(f"liger_rope: q {tuple(q.shape)}, k {tuple(k.shape)} need cos/sin [S, hd / 2], "
                         f"got {tuple(cos.shape)}")
    return rope.apply(q, k, cos.to(q.dtype), sin.to(q.dtype), None, 1, hd)
