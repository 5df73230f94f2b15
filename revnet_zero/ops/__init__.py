"""Small ops: the fused head + cross-entropy loss, size limits."""
from .limits import INT32_MAX_NUMEL, check_int32_numel
from .loss import fused_linear_cross_entropy

__all__ = ["INT32_MAX_NUMEL", "check_int32_numel", "fused_linear_cross_entropy"]
