"""``JAXMemoryScheduler``: the PyTorch memory policies mapped onto JAX, and a jitted training step."""
from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from .model import ReversibleTransformerJAX, check_ids

REMAT_POLICIES = ("recompute", "store_attention", "checkpoint", "store")


@dataclass(frozen=True)
class JAXMemoryScheduler:
    """How a ``ReversibleTransformerJAX`` keeps (or rebuilds) its activations in training.

    ``schedule(model)`` returns a ``TrainStep``: ``step(variables, input_ids, labels=None,
    dropout_key=None) -> (loss, grads)``, jitted, with the ids checked before tracing.

    Example::

        step = JAXMemoryScheduler(scan_layers=True, rematerialization_policy="recompute").schedule(model)
        loss, grads = step(params, ids)
    """

    scan_layers: bool = True                     # blocks under lax.scan (stacked weights) or a Python loop
    rematerialization_policy: str = "recompute"  # 'recompute': the reversible custom_vjp, nothing kept per
    # block; 'store_attention': jax.checkpoint per block keeping its inputs and attention output;
    # 'checkpoint': jax.checkpoint keeping block inputs only (plain remat); 'store': plain autodiff
    offload_to_cpu: bool = False                 # keep the attention outputs in pinned host memory
    # (with 'store_attention' only: the other policies keep nothing a block could move)

    def __post_init__(self):
        if not isinstance(self.scan_layers, bool) or not isinstance(self.offload_to_cpu, bool):
            raise TypeError(f"scan_layers and offload_to_cpu must be bools, got {self.scan_layers!r}, "
                            f"{self.offload_to_cpu!r}")
        if self.rematerialization_policy not in REMAT_POLICIES:
            raise ValueError(f"rematerialization_policy must be one of {REMAT_POLICIES}, "
                             f"got {self.rematerialization_policy!r}")
        if self.offload_to_cpu and self.rematerialization_policy != "store_attention":
            raise ValueError("offload_to_cpu=True moves the kept attention outputs to host memory, so it needs "
                             "rematerialization_policy='store_attention'; got "
                             f"{self.rematerialization_policy!r}")

    @property
    def memory_policy(self) -> str:
        """The model's ``memory_policy`` this scheduler sets."""
        return "offload_attention" if self.offload_to_cpu else self.rematerialization_policy

    def schedule(self, model: ReversibleTransformerJAX) -> TrainStep:
        if not isinstance(model, ReversibleTransformerJAX):
            raise TypeError(f"schedule needs a ReversibleTransformerJAX, got {type(model).__name__}")
        if self.offload_to_cpu:
            kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
            if "pinned_host" not in kinds:
                raise ValueError(f"offload_to_cpu=True needs a 'pinned_host' memory kind; {jax.devices()[0]} "
                                 f"has {sorted(kinds)}")
        return TrainStep(model.clone(use_scan=self.scan_layers, memory_policy=self.memory_policy))


class TrainStep:
    """``(variables, input_ids [B, S], labels=None, dropout_key=None) -> (loss, grads)``, jitted.

    ``lower(...)`` gives the lowered step (``.compile().memory_analysis()`` for its memory).
    """

    def __init__(self, model: ReversibleTransformerJAX):
        self.model = model
        self._jit = jax.jit(self._loss_and_grads)

    def _loss_and_grads(self, variables, input_ids, labels, dropout_key):
        def loss(v):
            rngs = None if dropout_key is None else {"dropout": dropout_key}
            return self.model.apply(v, input_ids, labels, return_logits=False,
                                    deterministic=dropout_key is None, rngs=rngs).loss
        return jax.value_and_grad(loss)(variables)

    def _check(self, input_ids, labels):
        check_ids(np.asarray(input_ids), self.model.vocab_size, self.model.max_seq_len)
        if labels is not None and np.shape(labels) != np.shape(input_ids):
            raise ValueError(f"labels must be shaped like input_ids {np.shape(input_ids)}, got {np.shape(labels)}")

    def __call__(self, variables, input_ids, labels=None, dropout_key=None):
        self._check(input_ids, labels)
        return self._jit(variables, input_ids, labels, dropout_key)

    def lower(self, variables, input_ids, labels=None, dropout_key=None):
        return self._jit.lower(variables, input_ids, labels, dropout_key)
