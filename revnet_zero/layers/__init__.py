"""Reversible layers and couplings."""
from .coupling_layers import (AdditiveCoupling, AffineCoupling, BaseCoupling, CouplingType,
                              StepCoupling, make_coupling)

__all__ = ["AdditiveCoupling", "AffineCoupling", "BaseCoupling", "CouplingType", "StepCoupling",
           "make_coupling"]
