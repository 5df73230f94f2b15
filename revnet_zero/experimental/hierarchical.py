"""``HierarchicalReversibleAttention``: a reversible half block whose attention is hierarchical."""
from __future__ import annotations

from torch import Tensor

from ..engine import ReversibleBlock
from ..layers.attention_variants import HierarchicalAttention
from ..layers.coupling_layers import CouplingType, StepCoupling, make_coupling


class HierarchicalReversibleAttention(ReversibleBlock):
    """``y1 = x1 + HierAttn(x2)``, ``y2 = x2`` (or the affine rule), with ``HierarchicalAttention``:
    exact causal attention over the last ``local_window`` (to ``local_window + r_1 - 1``) tokens, and
    mean-pooled key/value blocks of ``compression_ratios[l]`` tokens at coarser levels for older
    positions, each past token covered exactly once, each pooled score raised by ``log(ratio)``.

    ``num_levels`` must equal ``len(compression_ratios)``; ratios increase and each divides the next.
    Call with one tensor ``[B, S, D]`` (both streams) or two; returns the pair of streams.

    Example::

        layer = HierarchicalReversibleAttention(d_model=96, num_heads=4, num_levels=2,
                                                compression_ratios=(2, 8), local_window=8)
        y1, y2 = layer(torch.randn(2, 41, 96))      # [2, 41, 96] each
    """

    def __init__(self, d_model: int, num_heads: int, num_levels: int = 3,
                 compression_ratios: tuple[int, ...] = (4, 16, 64), local_window: int = 1024,
                 coupling: CouplingType | str | StepCoupling = CouplingType.ADDITIVE, *,
                 num_kv_heads: int | None = None, dropout: float = 0.0, rope_theta: float = 10000.0,
                 norm_eps: float = 1e-5, backend: str = "auto", policy: str = "recompute"):
        c = make_coupling(coupling)
        attn = HierarchicalAttention(d_model, num_heads, num_levels, compression_ratios, local_window,
                                     num_kv_heads=num_kv_heads, backend=backend, dropout=dropout,
                                     rope_theta=rope_theta, norm_eps=norm_eps, out_multiplier=c.out_multiplier)
        super().__init__(make_coupling(c, f=attn), policy=policy)

    @property
    def attention(self) -> HierarchicalAttention:
        return self.coupling.f

    def forward(self, x1: Tensor, x2: Tensor | None = None, _tape=None, **kwargs) -> tuple[Tensor, Tensor]:
        return super().forward(x1, x1 if x2 is None else x2, _tape=_tape, **kwargs)
