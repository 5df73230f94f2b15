"""Reversible layers and couplings."""
from .coupling_layers import (AdditiveCoupling, AffineCoupling, BaseCoupling, CouplingType,
                              StepCoupling, make_coupling)
from .reversible_attention import KVCache, ReversibleAttention, SelfAttention
from .attention_variants import HierarchicalAttention, RationalFourierAttention, SlidingWindowAttention
from .reversible_ffn import FeedForward, ReversibleFFN
from .rotation_coupling import OrthogonalMixCoupling, OrthogonalMixing, RotationCoupling

__all__ = ["AdditiveCoupling", "AffineCoupling", "BaseCoupling", "CouplingType", "FeedForward",
           "HierarchicalAttention", "KVCache", "OrthogonalMixCoupling", "OrthogonalMixing", "RationalFourierAttention",
           "ReversibleAttention", "ReversibleFFN", "RotationCoupling", "SelfAttention", "SlidingWindowAttention",
           "StepCoupling", "make_coupling"]
