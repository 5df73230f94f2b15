"""RevNet-Zero: reversible transformers that train long contexts without keeping activations."""
# layers before engine: the layer modules import the engine, which imports only coupling_layers
from .layers import AdditiveCoupling, AffineCoupling, BaseCoupling, CouplingType
from .engine import ReversibleBlock, ReversibleSequence
from .models import ReversibleTransformer, TransformerConfig
from .memory import MemoryScheduler
from .conversion import convert_from_reversible, convert_to_reversible

__version__ = "0.1.0"
__all__ = ["AdditiveCoupling", "AffineCoupling", "BaseCoupling", "CouplingType", "MemoryScheduler",
           "ReversibleBlock", "ReversibleSequence", "ReversibleTransformer", "TransformerConfig",
           "__version__", "convert_from_reversible", "convert_to_reversible"]
