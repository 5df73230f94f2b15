"""An optimizer step fused into backward: each parameter is updated, and its gradient freed, as soon
as the gradient is accumulated.

A training step normally holds every parameter's gradient at the end of backward: for a 1.3B model in
float32 that is 5 GB on top of the activations. The reversible engine hands each block's parameter
gradients to autograd once, block by block, so with ``OptimizerInBackward`` only the gradients of the
block being differentiated are alive. Built on ``Tensor.register_post_accumulate_grad_hook`` (the
PyTorch recipe for this), with one optimizer per parameter: for element-wise optimizers such as
AdamW the updates are exactly those of one optimizer over all parameters.

Not compatible with anything that needs all gradients at once before the step: gradient clipping by
global norm, gradient accumulation over micro-batches, fp16 loss scaling. Every backward steps.

Example::

    opt = OptimizerInBackward(model.parameters(), torch.optim.AdamW, lr=3e-4, foreach=False)
    for ids in batches:
        model(ids).loss.backward()      # parameters are updated during this call; .grad stays None
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class OptimizerInBackward:
    """Per-parameter optimizers stepped from post-accumulate-grad hooks (see the module docstring)."""

    def __init__(self, params: Iterable[Tensor], optimizer_class=torch.optim.AdamW, **kwargs):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("OptimizerInBackward got no parameter that requires grad")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("OptimizerInBackward got the same parameter twice (tied weights: pass each once)")
        self.optimizers = {p: optimizer_class([p], **kwargs) for p in self.params}
        self._handles = [p.register_post_accumulate_grad_hook(self._step) for p in self.params]

    def _step(self, p: Tensor) -> None:
        opt = self.optimizers[p]
        opt.step()
        opt.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def state_dict(self) -> dict:
        return {"per_parameter": [self.optimizers[p].state_dict() for p in self.params]}

    def load_state_dict(self, state: dict) -> None:
        states = state["per_parameter"]
        if len(states) != len(self.params):
            raise ValueError(f"state for {len(states)} parameters, this optimizer has {len(self.params)}")
        for p, s in zip(self.params, states):
            self.optimizers[p].load_state_dict(s)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held now (every tensor in every parameter's state): for the budget of a
        full fine-tune, e.g. 8 bytes per parameter for float32 AdamW, about 2 for an 8-bit one."""
        return sum(t.numel() * t.element_size() for opt in self.optimizers.values() for state in opt.state.values()
                   for t in state.values() if isinstance(t, Tensor))

    def remove(self) -> None:
        """Remove the hooks: backward then leaves gradients in ``.grad`` again."""
        for h in self._handles:
            h.remove()
        self._handles = []
