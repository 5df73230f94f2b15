"""Couplings, re-exported from ``revnet_zero.couplings`` (the engine's own module) so that this
import path keeps working."""
from ..couplings import (AdditiveCoupling, AffineCoupling, BaseCoupling, CouplingType, StepCoupling,
                         make_coupling, seq_tiles)

__all__ = ["AdditiveCoupling", "AffineCoupling", "BaseCoupling", "CouplingType", "StepCoupling",
           "make_coupling", "seq_tiles"]
