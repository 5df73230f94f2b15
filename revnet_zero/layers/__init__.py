"""Reversible layers and couplings."""
from .coupling_layers import (AdditiveCoupling, AffineCoupling, BaseCoupling, CouplingType,
                              StepCoupling, make_coupling)
from .reversible_attention import KVCache, ReversibleAttention, SelfAttention
from .reversible_ffn import FeedForward, ReversibleFFN
from .rotation_coupling import OrthogonalMixCoupling, OrthogonalMixing, RotationCoupling

__all__ = ["AdditiveCoupling", "AffineCoupling", "BaseCoupling", "CouplingType", "FeedForward", "KVCache",
           "OrthogonalMixCoupling", "OrthogonalMixing", "ReversibleAttention", "ReversibleFFN", "RotationCoupling",
           "SelfAttention", "StepCoupling", "make_coupling"]
