"""Cross-entropy of a linear head without the full logits.

At long context the logits are the largest tensor of a training step (S x V: 64 KB per token in bf16 at
V = 32k). ``fused_linear_cross_entropy`` walks the tokens in chunks: for each chunk it forms the chunk's
logits, its loss, and at once the chunk's gradients with respect to the hidden states and the head
weight (softmax - one-hot is known in forward). Backward only scales the stored gradients by the
incoming scalar. Peak extra memory: one chunk of logits plus the two gradients, which training holds
anyway.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .limits import check_int32_numel

REDUCTIONS = ("mean", "sum")


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 8192,
                               ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets)`` computed ``chunk_size`` tokens at a time.

    hidden ``[N, D]``, weight ``[V, D]``, targets ``[N]`` (integers in ``[0, V)`` or ``ignore_index``).
    Returns a scalar: the mean over non-ignored targets (``nan`` if all are ignored, as in
    ``F.cross_entropy``) or their sum. Under autocast the two matmuls run in the autocast dtype. The
    softmax, the loss and the head gradient accumulate in float32, or in float64 when the inputs are
    float64 (so a float64 model keeps float64 gradients end to end). The gradients are computed in forward, so a second backward through the same
    call (``retain_graph=True``) raises.

    Example::

        h = torch.randn(10, 64, requires_grad=True)
        w = torch.randn(1000, 64, requires_grad=True)
        t = torch.randint(0, 1000, (10,))
        loss = fused_linear_cross_entropy(h, w, t, chunk_size=4)
        loss.backward()
    """
    _check(hidden, weight, targets, chunk_size, ignore_index, reduction)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, reduction)
    loss, _, _ = _chunked(hidden, weight, targets, chunk_size, ignore_index, reduction, False, False)
    return loss


def _check(hidden, weight, targets, chunk_size, ignore_index, reduction) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fused_linear_cross_entropy: {name} must be a Tensor, got {type(t).__name__}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy needs hidden [N, D] and weight [V, D], got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32, got {targets.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    vocab = weight.shape[0]
    check_int32_numel(chunk_size * vocab, f"a logits chunk [chunk_size={chunk_size}, V={vocab}]",
                      "Use a smaller chunk_size.")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if targets.numel() and bool(bad.any()):
        lo, hi = targets[bad].aminmax()
        raise ValueError(f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found "
                         f"values from {int(lo)} to {int(hi)} outside it")


def _chunked(hidden, weight, targets, chunk_size, ignore_index, reduction, need_dh, need_dw):
    """Loss and, where asked, its gradients with respect to hidden and weight."""
    # at least float32 (bf16/fp16 sums of a long sequence lose the loss), float64 for float64 inputs
    acc = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    valid = targets != ignore_index
    count = valid.sum().to(acc)
    denom = count if reduction == "mean" else torch.ones_like(count)
    # Gradient rows: 0 for ignored targets, 1/denom otherwise (0, not nan, when all are ignored).
    row_scale = valid.to(acc) / denom.clamp(min=1)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        h, t = hidden[start:end], targets[start:end].long()
        logits = h @ weight.t()                               # (C, V), in the autocast dtype
        dtype = logits.dtype
        logits = logits.to(acc)
        lse = torch.logsumexp(logits, dim=-1)                 # [C]
        idx = t.clamp(min=0)[:, None]                         # ignored rows read column 0, weighted 0
        picked = logits.gather(1, idx).squeeze(1)
        total += torch.where(valid[start:end], lse - picked, 0.0).sum()
        if not (need_dh or need_dw):
            continue
        grad = logits.sub_(lse[:, None]).exp_()               # softmax, in place of the logits
        grad.scatter_add_(1, idx, torch.full_like(picked, -1.0)[:, None])
        grad = grad.mul_(row_scale[start:end, None]).to(dtype)
        del logits
        if need_dh:
            dh[start:end] = grad @ weight
        if need_dw:
            dw += grad.t() @ h
    loss = total / denom
    return loss, dh, (dw.to(weight.dtype) if dw is not None else None)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index, reduction):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dh, dw = _chunked(hidden, weight, targets, chunk_size, ignore_index, reduction, need_dh, need_dw)
        ctx.save_for_backward(dh, dw)
        ctx.used = False
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("fused_linear_cross_entropy: backward ran twice through one call; its "
                               "gradients are computed in forward and scaled in place, so retain_graph "
                               "is not supported: call it again instead")
        ctx.used = True
        dh, dw = ctx.saved_tensors
        # Scaled in place: at long context dh is as large as the hidden states.
        if dh is not None:
            dh.mul_(grad_loss.to(dh.dtype))
        if dw is not None:
            dw.mul_(grad_loss.to(dw.dtype))
        return dh, dw, None, None, None, None
