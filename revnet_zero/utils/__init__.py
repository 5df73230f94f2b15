"""Debugging and analysis tools."""
from .debugging import ReversibleGradientChecker, gradient_error, is_invertible
from .profiling import DetailedMemoryProfiler, MemoryReport

__all__ = ["DetailedMemoryProfiler", "MemoryReport", "ReversibleGradientChecker", "gradient_error",
           "is_invertible"]
