"""Compatibility with peft's LoRA layers inside converted (BDIA) layers."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def plain_lora(module: nn.Module) -> bool:
    """A peft LoRA layer whose active adapters are vanilla (no DoRA or other variant) without dropout."""
    variants = getattr(module, "lora_variant", None)
    dropouts = getattr(module, "lora_dropout", None)
    if not hasattr(module, "cast_input_dtype_enabled") or variants is None or not isinstance(dropouts, nn.ModuleDict):
        return False
    active = [a for a in getattr(module, "active_adapters", []) if a in dropouts]
    return all(a not in variants and (isinstance(dropouts[a], nn.Identity) or
                                      (isinstance(dropouts[a], nn.Dropout) and dropouts[a].p == 0)) for a in active)


@contextlib.contextmanager
def adapter_input_casts_off(layer: nn.Module, device_type: str):
    """Under autocast, skip peft's cast of each LoRA adapter's input to the adapter weights' dtype.

    peft keeps adapters in float32 on a bf16 model and casts the layer input to float32 for each
    adapter; autocast then casts it straight back to bf16 for the adapter's matmul, which saves that
    bf16 copy for backward. Both casts are exact round trips, so skipping the first (peft's own switch,
    ``cast_input_dtype_enabled``) changes no bit, and the adapters save the tensors the layer saves
    anyway instead of a copy each (q/k/v/o adapters: three copies of ``[S, d]`` fewer, 24 KB per token
    for Llama-3-8B, held through each layer's backward)."""
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    mods = [m for m in layer.modules() if m.__dict__.get("cast_input_dtype_enabled") is True and plain_lora(m)]
    for m in mods:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.cast_input_dtype_enabled = True
