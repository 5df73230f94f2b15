"""What the models return."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ModelOutput:
    """``loss``: scalar, or ``None`` without targets. ``last_hidden_state``: ``[B, S, D]`` after the final
    norm. ``logits``: ``[B, S, V]``, or ``None`` (never formed in training unless asked for)."""

    loss: Tensor | None
    last_hidden_state: Tensor
    logits: Tensor | None = None
