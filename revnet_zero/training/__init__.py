"""Training: one ``Trainer`` and three front doors over it, checkpoints, activation memory."""
from .activation_memory import compare_policies, count_saved_tensors, cuda_peak_bytes, saved_bytes
from .checkpoint import (atomic_write, latest_checkpoint, load_checkpoint, load_weights, read_weights,
                         save_checkpoint, save_weights)
from .front_doors import DistributedReversibleTrainer, LongContextTrainer, ReversibleAMPTrainer
from .in_backward import OptimizerInBackward
from .trainer import Trainer, TrainingConfig, lr_multiplier

__all__ = ["DistributedReversibleTrainer", "LongContextTrainer", "OptimizerInBackward", "ReversibleAMPTrainer",
           "Trainer", "TrainingConfig", "atomic_write", "compare_policies", "count_saved_tensors", "cuda_peak_bytes",
           "latest_checkpoint", "load_checkpoint", "load_weights", "lr_multiplier", "read_weights",
           "save_checkpoint", "save_weights", "saved_bytes"]
