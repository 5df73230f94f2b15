"""Training past one GPU: sequence parallelism inside reversible blocks (``sequence_parallel.py``).

Data parallelism (DDP, FSDP2) is in ``revnet_zero.training.DistributedReversibleTrainer``.
"""
from .sequence_parallel import (MODES, SequenceParallel, average_gradients, disable_sequence_parallel,
                                enable_sequence_parallel)

__all__ = ["MODES", "SequenceParallel", "average_gradients", "disable_sequence_parallel",
           "enable_sequence_parallel"]
