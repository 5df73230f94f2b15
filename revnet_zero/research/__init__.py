"""Research tools: ``MemoryEfficientResearch``, a measured comparison of memory policies and couplings and
of how activation memory scales with sequence length and depth."""
from .memory_study import MemoryEfficientResearch, ResearchConfig

__all__ = ["MemoryEfficientResearch", "ResearchConfig"]
