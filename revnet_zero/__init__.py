"""RevNet-Zero: reversible transformers that train long contexts without keeping activations."""
# .layers first: its reversible layers import .engine, which needs only .layers.coupling_layers
# (loaded by then); importing .engine first would re-enter it half-initialised.
from .layers import AdditiveCoupling, AffineCoupling, BaseCoupling, CouplingType
from .engine import ReversibleBlock, ReversibleSequence
from .models import ReversibleTransformer, TransformerConfig

__version__ = "0.1.0"
__all__ = ["AdditiveCoupling", "AffineCoupling", "BaseCoupling", "CouplingType", "ReversibleBlock",
           "ReversibleSequence", "ReversibleTransformer", "TransformerConfig", "__version__"]
