"""Debugging and analysis tools."""
from .debugging import ReversibleGradientChecker, gradient_error, is_invertible
from .profiling import DetailedMemoryProfiler, MemoryReport
from .stability import BlockStability, StabilityAnalyzer, StabilityReport

__all__ = ["BlockStability", "DetailedMemoryProfiler", "MemoryReport", "ReversibleGradientChecker",
           "StabilityAnalyzer", "StabilityReport", "gradient_error", "is_invertible"]
