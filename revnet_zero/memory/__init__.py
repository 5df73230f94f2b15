"""Memory policies: kept attention, the scheduler and the profiler."""
from .kept_attention import AttentionStore, attention

__all__ = ["AttentionStore", "attention"]
