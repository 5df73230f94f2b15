"""Debugging and analysis tools."""
from .debugging import ReversibleGradientChecker, gradient_error, is_invertible

__all__ = ["ReversibleGradientChecker", "gradient_error", "is_invertible"]
