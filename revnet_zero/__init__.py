"""RevNet-Zero: reversible transformers that train long contexts without keeping activations."""
from .conversion import convert_from_reversible, convert_to_reversible
from .couplings import AdditiveCoupling, AffineCoupling, BaseCoupling, CouplingType
from .engine import ReversibleBlock, ReversibleSequence
from .memory import MemoryScheduler
from .models import ReversibleTransformer, TransformerConfig

__version__ = "0.1.0"
__all__ = ["AdditiveCoupling", "AffineCoupling", "BaseCoupling", "CouplingType", "MemoryScheduler",
           "ReversibleBlock", "ReversibleSequence", "ReversibleTransformer", "TransformerConfig",
           "__version__", "convert_from_reversible", "convert_to_reversible"]
