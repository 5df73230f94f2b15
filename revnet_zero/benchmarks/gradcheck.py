"""Gradients of one model in several modes against a reference mode, on the same batch.

The reference mode is run twice: the second run's difference from the first is the floor that
non-deterministic kernels (SDPA backward's atomics) set; a mode's error is read against it.
"""
from __future__ import annotations

import statistics

import torch
from torch import Tensor, nn

from .measure import free_memory, is_oom, model_loss
from .modes import apply_mode


def mode_grads(model: nn.Module, mode: str, ids: Tensor, amp_dtype: torch.dtype | None) -> tuple[float, dict]:
    """Loss and ``{name: grad}`` of one forward/backward in ``mode``; the model's grads are left None."""
    model.zero_grad(set_to_none=True)
    with apply_mode(model, mode):
        with torch.autocast(ids.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = model_loss(model, ids)
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def rel_errors(grads: dict, ref: dict) -> dict:
    """‖g − g_ref‖ / ‖g_ref‖ per parameter (float64 norms); parameters with a zero reference are left out."""
    missing = sorted(set(ref) ^ set(grads))
    if missing:
        raise ValueError(f"gradients missing on one side: {missing[:5]}")
    out = {}
    for name, r in ref.items():
        denom = r.double().norm().item()
        if denom > 0:
            out[name] = (grads[name].double() - r.double()).norm().item() / denom
    return out


def _summary(errs: dict) -> tuple[float, float, list]:
    worst = sorted(errs.items(), key=lambda kv: -kv[1])[:3]
    return max(errs.values()), statistics.median(errs.values()), worst


def compare_grads(model: nn.Module, ids: Tensor, amp_dtype: torch.dtype | None, modes: list[str],
                  reference: str = "standard") -> list[dict]:
    """One row per mode: loss and per-parameter gradient error against ``reference``, with its floor.

    Example::

        rows = compare_grads(model, ids, torch.bfloat16, ["revnet_zero", "full_ac"])
    """
    ref_loss, ref = mode_grads(model, reference, ids, amp_dtype)
    _, again = mode_grads(model, reference, ids, amp_dtype)
    floor_max, floor_median, _ = _summary(rel_errors(again, ref))
    del again
    rows = []
    for mode in modes:
        row = {"mode": mode, "reference": reference, "seq_len": ids.shape[1], "batch": ids.shape[0],
               "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32", "loss_ref": ref_loss,
               "floor_max": floor_max, "floor_median": floor_median, "params": len(ref)}
        try:
            loss, grads = mode_grads(model, mode, ids, amp_dtype)
        except Exception as e:  # noqa: BLE001 - recorded in the row
            model.zero_grad(set_to_none=True)
            row.update(status="oom" if is_oom(e) else "error", error=f"{type(e).__name__}: {str(e)[:300]}")
        else:
            mx, med, worst = _summary(rel_errors(grads, ref))
            row.update(status="ok", loss=loss, loss_rel_diff=abs(loss - ref_loss) / max(abs(ref_loss), 1e-30),
                       max_rel_err=mx, median_rel_err=med, worst=worst)
            del grads
        free_memory(ids.device)
        rows.append(row)
    return rows
