"""Reconstruction drift: how far the inputs a reversible backward rebuilds are from the true ones.

The backward rebuilds each block's inputs from its outputs by subtraction (division for affine
couplings). Each rebuild rounds; the error stays at float rounding when the streams are large next
to what the sub-functions add, and grows when they are small next to it (see docs/numerics.md).
``DriftProbe`` keeps a strided sample of the true inputs of each run of recomputing blocks during
forward and compares the rebuilt inputs with it during backward.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

SAMPLE_POSITIONS = 16   # sequence positions kept per stream (all batch rows, full width)


def _sample(x: Tensor) -> Tensor:
    """About ``SAMPLE_POSITIONS`` positions of ``x [B, S, ...]``, spread along the sequence."""
    if x.dim() < 2:
        return x
    return x[:, ::max(1, x.shape[1] // SAMPLE_POSITIONS)]


class DriftProbe:
    """The true inputs of one sequence call's runs (sampled), and the drift measured against them.

    ``owner`` gets ``last_drift`` (the largest relative drift of the step, a float) and is warned
    about once when it passes ``bound``.
    """

    def __init__(self, owner: nn.Module, bound: float):
        self.owner, self.bound = owner, bound
        self.kept: dict[int, tuple[Tensor, Tensor]] = {}

    def keep(self, index: int, x1: Tensor, x2: Tensor) -> None:
        with torch.no_grad():
            self.kept[index] = (_sample(x1).clone(), _sample(x2).clone())

    def compare(self, index: int, r1: Tensor, r2: Tensor) -> None:
        """Compare the rebuilt inputs ``r1, r2`` of block ``index`` with the kept ones."""
        if index not in self.kept:
            return
        t1, t2 = self.kept.pop(index)
        with torch.no_grad():
            err = torch.stack([(_sample(r1) - t1).double().norm(), (_sample(r2) - t2).double().norm()]).norm()
            ref = torch.stack([t1.double().norm(), t2.double().norm()]).norm()
            drift = (err / ref.clamp_min(torch.finfo(torch.float64).tiny)).item()
        last = getattr(self.owner, "last_drift", None)
        if last is None or (last == last and not drift <= last):   # a NaN, once measured, stays
            self.owner.last_drift = drift
        if not drift <= self.bound and not getattr(self.owner, "_drift_warned", False):
            self.owner._drift_warned = True
            warnings.warn(
                f"{type(self.owner).__name__}: the inputs rebuilt in backward are {drift:.2e} (relative) away "
                f"from the true ones, more than check_drift={self.bound:g}; the gradients can be off by as "
                "much. Usually the streams are small next to what the sub-functions add to them: see "
                "docs/numerics.md (scale the inputs up or the branches down, or use policy='store' for the "
                "first blocks)", RuntimeWarning, stacklevel=2)
