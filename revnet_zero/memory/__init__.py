"""Memory policies: kept attention, the profiler and the scheduler."""
from ..ops.kept_attention import AttentionStore, attention
from .profiler import LayerCost, MemoryProfile, MemoryProfiler
from .scheduler import AdaptiveScheduler, LayerScheduler, MemoryScheduler, Plan, plan, set_scheduler, verified_plan

__all__ = ["AdaptiveScheduler", "AttentionStore", "LayerCost", "LayerScheduler", "MemoryProfile",
           "MemoryProfiler", "MemoryScheduler", "Plan", "attention", "plan", "set_scheduler", "verified_plan"]
