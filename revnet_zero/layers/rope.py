"""Rotary position embedding (RoPE), in the Llama / Hugging Face layout: dimension i of a head is
rotated together with dimension i + head_dim / 2."""
from __future__ import annotations

import torch
from torch import Tensor


def rope_cos_sin(start: int, length: int, head_dim: int, theta: float,
                 device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin ``[length, head_dim / 2]`` (float32) for positions ``start .. start + length - 1``.

    The angles are formed in float64: at position 2M a float32 angle is off by up to 0.06 rad.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    pos = torch.arange(start, start + length, dtype=torch.float64, device=device)
    angles = torch.outer(pos, inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[B, H, S, head_dim]`` by the angles of ``cos``/``sin`` ``[S, head_dim / 2]``.

    Computed in ``x``'s dtype (as Hugging Face Llama does), so no float32 copy of q and k is made.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
