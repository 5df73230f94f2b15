"""Reversible transformer models: the causal decoder (``ReversibleTransformer`` / ``ReversibleGPT``) and
the bidirectional encoder (``ReversibleBERT``)."""
from .config import PRESETS, TransformerConfig
from .outputs import ModelOutput
from .reversible_bert import ReversibleBERT
from .reversible_gpt import ReversibleGPT
from .reversible_transformer import ReversibleLM, ReversibleTransformer

__all__ = ["PRESETS", "ModelOutput", "ReversibleBERT", "ReversibleGPT", "ReversibleLM",
           "ReversibleTransformer", "TransformerConfig"]
