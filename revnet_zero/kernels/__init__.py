"""Triton kernels for the passes a profile shows the time in, each beside its plain PyTorch reference.

Needs ``triton`` (``pip install revnet-zero[triton]``); ``import revnet_zero`` does not import this
package. Every kernel is a ``torch.library.custom_op`` (autograd and torch.compile see an ordinary op)
and runs where ``runs_on`` says: CUDA tensors, or CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is first imported), which is how CI tests them.

* ``bdia_grid_step`` / ``bdia_grid_unstep``: BDIA's update and fixed-point step, forward and back, one
  pass each, bitwise equal to the eager integer path (``revnet_zero.conversion.grid``); chosen per
  model by ``convert_to_reversible(..., grid_step='triton')``.
* ``causal_linear_attention`` / ``TritonRFAttention``: causal chunked linear attention on non-negative
  feature maps (random-Fourier-feature attention), forward and backward.
* ``affine_separate_vjp`` / ``TritonAffineCoupling``: the affine coupling's stream rebuild and its
  gradients in one pass, in the engine's backward.
"""
from __future__ import annotations

import os

try:
    import triton  # noqa: F401
except ImportError as e:   # the optional dependency of this subpackage only
    raise ImportError("revnet_zero.kernels needs Triton: pip install revnet-zero[triton]") from e

from torch import Tensor

from .grid_step import (
    bdia_grid_step,
    bdia_grid_unstep,
    reference_grid_step,
    reference_grid_unstep,
)
from .linear_attention import (
    TritonRFAttention,
    causal_linear_attention,
    naive_causal_linear_attention,
)
from .stream import TritonAffineCoupling, affine_separate_vjp, reference_affine_separate_vjp

# Triton decides at a kernel's definition (this import) whether it is interpreted, so this is read once.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """Whether this package's kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETED


def runs_on(t: Tensor) -> bool:
    """Whether the kernels can run on ``t``: a CUDA tensor, or a CPU tensor under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


__all__ = ["TritonAffineCoupling", "TritonRFAttention", "affine_separate_vjp", "bdia_grid_step", "bdia_grid_unstep",
           "causal_linear_attention", "interpreting", "naive_causal_linear_attention",
           "reference_affine_separate_vjp", "reference_grid_step", "reference_grid_unstep", "runs_on"]
