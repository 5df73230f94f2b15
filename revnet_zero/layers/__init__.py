"""Reversible layers and couplings."""
from .coupling_layers import (AdditiveCoupling, AffineCoupling, BaseCoupling, CouplingType,
                              StepCoupling, make_coupling)
from .reversible_attention import KVCache, ReversibleAttention, SelfAttention
from .reversible_ffn import FeedForward, ReversibleFFN

__all__ = ["AdditiveCoupling", "AffineCoupling", "BaseCoupling", "CouplingType", "FeedForward", "KVCache",
           "ReversibleAttention", "ReversibleFFN", "SelfAttention", "StepCoupling", "make_coupling"]
