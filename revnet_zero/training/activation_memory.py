"""Activation memory of one training step, measured, for reversible vs standard (plain autograd) training.

Two measures, and every result says which one it is:
- ``saved_tensors``: bytes of the tensors autograd keeps for backward during one forward, counted with
  ``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters excluded. Works on any
  device; it does not see what lives only inside backward.
- ``cuda_peak``: ``torch.cuda.max_memory_allocated`` during one forward + backward, above what was
  allocated before it (weights, gradients, the batch).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def count_saved_tensors(model: nn.Module, by_block: bool = False):
    """Counts the bytes autograd saves for backward inside the block; yields a dict that fills in:
    ``{'total': bytes}``, plus ``'block i'`` and ``'outside blocks'`` entries when ``by_block``."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    where, seen, counts = ["outside blocks"], {}, defaultdict(int)
    handles = []
    if by_block:
        for i, block in enumerate(model.blocks.blocks):
            handles.append(block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, f"block {i}")))
            handles.append(block.register_forward_hook(lambda m, a, o: where.__setitem__(0, "outside blocks")))

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = storage.nbytes()
            counts[where[0]] += storage.nbytes()
            counts["total"] += storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield counts
    finally:
        for h in handles:
            h.remove()


def _loss(model: nn.Module, ids: Tensor, autocast_dtype) -> Tensor:
    with torch.autocast(ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return model(ids, labels=ids).loss


def saved_bytes(model: nn.Module, ids: Tensor, by_block: bool = False, autocast_dtype=None) -> dict:
    """Saved-tensor bytes of one forward of ``model`` on ``ids`` [B, S] (backward run after, to free)."""
    with count_saved_tensors(model, by_block) as counts:
        loss = _loss(model, ids, autocast_dtype)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return dict(counts)


def cuda_peak_bytes(model: nn.Module, ids: Tensor, autocast_dtype=None) -> int:
    """Peak CUDA memory of one forward + backward above the memory allocated before it. A first step
    allocates the gradients, so the measured one starts with weights and gradients in place."""
    _loss(model, ids, autocast_dtype).backward()
    torch.cuda.synchronize(ids.device)
    torch.cuda.reset_peak_memory_stats(ids.device)
    base = torch.cuda.memory_allocated(ids.device)
    _loss(model, ids, autocast_dtype).backward()
    torch.cuda.synchronize(ids.device)
    peak = torch.cuda.max_memory_allocated(ids.device) - base
    model.zero_grad(set_to_none=True)
    return peak


def compare_policies(model: nn.Module, ids: Tensor, autocast_dtype=None) -> dict:
    """Activation memory of the same model and batch trained reversibly (``'recompute'``) and as plain
    autograd (``'store'``): ``{'measure': 'saved_tensors' | 'cuda_peak', 'reversible': bytes,
    'standard': bytes}``. The model's policies are restored.
    """
    blocks = model.blocks
    before = [b.policy for b in blocks.blocks]
    measure = "cuda_peak" if ids.device.type == "cuda" else "saved_tensors"
    result = {"measure": measure}
    try:
        for name, policy in (("standard", "store"), ("reversible", "recompute")):
            blocks.set_policy(policy)
            if measure == "cuda_peak":
                result[name] = cuda_peak_bytes(model, ids, autocast_dtype)
            else:
                result[name] = saved_bytes(model, ids, autocast_dtype=autocast_dtype)["total"]
    finally:
        for block, policy in zip(blocks.blocks, before):
            block.policy = policy
    return result
