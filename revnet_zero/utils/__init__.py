"""Debugging and analysis tools."""
from .advisor import OptimizationAdvisor, Recommendation
from .debugging import ReversibleGradientChecker, gradient_error, is_invertible
from .pitfalls import CommonPitfalls, Pitfall
from .profiling import DetailedMemoryProfiler, MemoryReport
from .stability import BlockStability, StabilityAnalyzer, StabilityReport

__all__ = ["BlockStability", "CommonPitfalls", "DetailedMemoryProfiler", "MemoryReport", "OptimizationAdvisor",
           "Pitfall", "Recommendation", "ReversibleGradientChecker", "StabilityAnalyzer", "StabilityReport",
           "gradient_error", "is_invertible"]
