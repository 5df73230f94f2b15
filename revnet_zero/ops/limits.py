"""Size limits that kernels impose."""
from __future__ import annotations

# The largest element count whose every flat index (0 .. 2^31 - 1) fits in a signed 32-bit integer.
# Kernels that compute offsets in int32 read wrapped addresses past it: silent corruption or an
# illegal memory access (e.g. pytorch#187227, pytorch#147585 for masked SDPA; fla#1080).
INT32_MAX_NUMEL = 2**31


def check_int32_numel(numel: int, what: str, hint: str = "") -> None:
    """Refuse a tensor of ``numel`` elements that a kernel may index with 32-bit integers."""
    if numel > INT32_MAX_NUMEL:
        raise ValueError(f"{what} would have {numel:,} elements, more than 2^31 = {INT32_MAX_NUMEL:,}: "
                         f"kernels indexing it with 32-bit offsets can return wrong results. {hint}".rstrip())
