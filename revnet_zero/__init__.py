"""RevNet-Zero: reversible transformers that train long contexts without keeping activations."""
from .engine import ReversibleBlock, ReversibleSequence
from .layers import AdditiveCoupling, AffineCoupling, BaseCoupling, CouplingType

__version__ = "0.1.0"
__all__ = ["AdditiveCoupling", "AffineCoupling", "BaseCoupling", "CouplingType", "ReversibleBlock",
           "ReversibleSequence", "__version__"]
