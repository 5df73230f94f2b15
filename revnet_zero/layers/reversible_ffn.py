"""The position-wise feed-forward network as a coupling sub-function, and the reversible FFN layer."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..couplings import CouplingType, StepCoupling, make_coupling
from ..engine import ReversibleBlock
from ..ops.limits import check_int32_numel
from ..ops.norm import compute_dtype
from .rope import norm_rope

ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "swish": F.silu, "relu": F.relu}


class FeedForward(nn.Module):
    """RMSNorm -> ``act(x W_gate) * (x W_up)`` (gated: SwiGLU with silu, GeGLU with gelu) or ``act(x W_in)``
    -> ``W_out``: ``[B, S, D] -> [B, S, out_multiplier * D]``.

    ``seq_chunk``: positions per tile. The engine runs a module that has this attribute in tiles along
    the sequence (dim 1), in forward and in the backward recompute, so the ``[B, S, d_ff]``
    intermediates never exist for the whole sequence; ``None`` runs it whole.

    Example::

        ffn = FeedForward(d_model=96, d_ff=256, activation="silu", gated=True)
        y = ffn(torch.randn(2, 11, 96))             # [2, 11, 96]
    """

    kernels = "torch"   # the norm: 'torch', or 'liger' (Liger-Kernel's, on CUDA; layers.rope.norm_rope)

    def __init__(self, d_model: int, d_ff: int, activation: str = "silu", gated: bool = True,
                 dropout: float = 0.0, norm_eps: float = 1e-5, out_multiplier: int = 1,
                 seq_chunk: int | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if seq_chunk is not None and (isinstance(seq_chunk, bool) or not isinstance(seq_chunk, int)
                                      or seq_chunk < 1):
            raise ValueError(f"seq_chunk must be a positive int or None, got {seq_chunk!r}")
        self.activation, self.gated, self.seq_chunk = activation, gated, seq_chunk
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.w_in = nn.Linear(d_model, (2 if gated else 1) * d_ff, bias=False)   # [gate; up] when gated
        self.w_out = nn.Linear(d_ff, out_multiplier * d_model, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        B, S, _ = x.shape
        check_int32_numel(B * S * self.w_in.out_features, f"the FFN intermediate [B={B}, S={S}, "
                          f"{self.w_in.out_features}]", "Set ffn_chunk_size (seq_chunk) to tile the sequence.")
        norm = norm_rope(self.kernels)[0]
        h = self.w_in(norm(x, self.norm.weight, self.norm.eps, compute_dtype(self.norm.weight)))
        act = ACTIVATIONS[self.activation]
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = act(gate) * up
        else:
            h = act(h)
        return self.drop(self.w_out(h))


class ReversibleFFN(ReversibleBlock):
    """A reversible half block: ``y1 = x1``, ``y2 = x2 + FFN(x1)`` (affine: ``y2 = x2 * s + t``).

    After a ``ReversibleAttention`` it completes one standard reversible transformer block. Call it with
    one tensor ``[B, S, D]`` (taken as both streams) or two; it returns the pair of streams.
    ``coupling_fn``: ``None`` (additive), a ``CouplingType`` or its name, or a fresh ``StepCoupling``
    without ``g`` such as ``AffineCoupling(split_dim=-1, scale_init=0.1)`` (the FFN then outputs twice
    the width). ``use_geglu``: gated unit (GeGLU with ``activation='gelu'``, SwiGLU with ``'silu'``).

    Example::

        ffn = ReversibleFFN(d_model=96, d_ff=256, coupling_fn=AffineCoupling(split_dim=-1, scale_init=0.1),
                            activation="gelu", use_geglu=True)
        y1, y2 = ffn(torch.randn(2, 11, 96))
    """

    def __init__(self, d_model: int, d_ff: int, coupling_fn: CouplingType | str | StepCoupling | None = None,
                 activation: str = "gelu", use_geglu: bool = False, dropout: float = 0.0, *,
                 norm_eps: float = 1e-5, seq_chunk: int | None = None, policy: str = "recompute"):
        c = make_coupling(CouplingType.ADDITIVE if coupling_fn is None else coupling_fn)
        ffn = FeedForward(d_model, d_ff, activation, use_geglu, dropout, norm_eps, c.out_multiplier, seq_chunk)
        super().__init__(make_coupling(c, g=ffn), policy=policy)

    @property
    def ffn(self) -> FeedForward:
        return self.coupling.g

    def forward(self, x1: Tensor, x2: Tensor | None = None, _tape=None, **kwargs) -> tuple[Tensor, Tensor]:
        return super().forward(x1, x1 if x2 is None else x2, _tape=_tape, **kwargs)
