"""Experimental layers: their math may still change between releases."""
from .hierarchical import HierarchicalReversibleAttention

__all__ = ["HierarchicalReversibleAttention"]
