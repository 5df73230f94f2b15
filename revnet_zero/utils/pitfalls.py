"""Concrete configuration problems of reversible models, each found by inspecting the model (and the
training configuration or scheduler, when given) and each with its fix."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..engine import ReversibleBlock, ReversibleSequence
from ..layers.coupling_layers import StepCoupling
from ..memory.scheduler import device_budget
from ..ops.limits import INT32_MAX_NUMEL
from .debugging import is_invertible


@dataclass
class Pitfall:
    name: str          # short identifier, e.g. 'batchnorm_in_block'
    description: str   # what is wrong, with the values found
    solution: str      # what to change


def _blocks(model: nn.Module) -> dict[str, ReversibleBlock]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ReversibleBlock)}


def _batchnorm(model, blocks, cfg) -> list[Pitfall]:
    out = []
    for bn, block in blocks.items():
        for n, m in block.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                out.append(Pitfall("batchnorm_in_block", f"{bn}.{n} is {type(m).__name__} with running statistics: "
                                   "the backward recompute updates them a second time",
                                   "use LayerNorm/RMSNorm, or track_running_stats=False"))
    return out


def _dropout_rng(model, blocks, cfg) -> list[Pitfall]:
    out = []
    for bn, block in blocks.items():
        rates = [m.p for m in block.modules() if isinstance(m, nn.Dropout) and m.p > 0]
        rates += [m.attention_dropout for m in block.modules() if getattr(m, "attention_dropout", 0) > 0]
        if rates and not block.preserve_rng_state and block.policy != "store":
            out.append(Pitfall("dropout_without_rng_capture", f"{bn} applies dropout (p={max(rates)}) with "
                               "preserve_rng_state=False: the recompute would draw other masks, so the engine "
                               "refuses its training forward (ValueError)",
                               "construct the block with preserve_rng_state=True (the default)"))
    return out


def _half_streams(model, blocks, cfg) -> list[Pitfall]:
    out = []
    for n, seq in model.named_modules():
        if not isinstance(seq, ReversibleSequence):
            continue
        dtype = seq.stream_dtype
        if dtype is None:
            dtype = next((p.dtype for p in seq.parameters()), torch.float32)
        if dtype in (torch.float16, torch.bfloat16):
            out.append(Pitfall("half_precision_streams", f"{n or 'the model'}'s streams are {dtype}: each block's "
                               "inputs are rebuilt by subtraction, which loses bits block after block",
                               "keep stream_dtype=torch.float32 and compute in bf16 under torch.autocast"))
    return out


def _custom_inverse(model, blocks, cfg) -> list[Pitfall]:
    out = []
    for bn, block in blocks.items():
        if isinstance(block.coupling, StepCoupling):
            continue   # built-in rules: their inverses are tested
        width = _width(block, cfg)
        if width is None:
            continue
        p = next(block.parameters(), None)
        x = torch.randn(2, 8, width, dtype=p.dtype if p is not None else torch.float32,
                        device=p.device if p is not None else None, generator=None)
        tol = 1e-4 if x.dtype == torch.float32 else 1e-2
        try:
            ok = is_invertible(block, x, torch.randn_like(x), atol=tol * max(1.0, x.abs().max().item()))
        except Exception as e:  # noqa: BLE001 - a failing inverse is what this check reports
            ok, why = False, f" ({type(e).__name__}: {e})"
        else:
            why = ""
        if not ok:
            out.append(Pitfall("coupling_not_invertible", f"{bn}: {type(block.coupling).__name__}.inverse does not "
                               f"undo forward on random streams [2, 8, {width}]{why}",
                               "fix inverse() so that inverse(*forward(x1, x2)) == (x1, x2)"))
    return out


def _width(block, cfg) -> int | None:
    d = getattr(cfg, "d_model", None)
    if d is None:
        lin = next((m for m in block.modules() if isinstance(m, nn.Linear)), None)
        d = lin.in_features if lin is not None else None
    return d


def _tiles(model, blocks, cfg) -> list[Pitfall]:
    mcfg = getattr(model, "config", None)
    seq_len = _first(cfg, ("max_length", "seq_len", "sequence_length")) or getattr(mcfg, "max_seq_len", None)
    batch = _first(cfg, ("batch_size",)) or 1
    out = []
    limit = getattr(mcfg, "max_seq_len", None)
    if seq_len is not None and limit is not None and seq_len > limit:
        out.append(Pitfall("sequence_longer_than_model", f"training length {seq_len:,} exceeds the model's "
                           f"max_seq_len={limit:,}: every batch that long is refused",
                           f"build the model with max_seq_len >= {seq_len}"))
    for bn, block in blocks.items():
        for n, m in block.named_modules():
            width = getattr(getattr(m, "w_in", None), "out_features", None)
            if seq_len is None or width is None:
                continue
            tile = min(seq_len, getattr(m, "seq_chunk", None) or seq_len)
            if batch * tile * width > INT32_MAX_NUMEL:
                out.append(Pitfall("ffn_tile_too_large", f"{bn}.{n}: an FFN tile of [B={batch}, {tile:,}, {width}] "
                                   f"= {batch * tile * width:,} elements passes 2^31 (int32 indexing)",
                                   f"set ffn_chunk_size <= {INT32_MAX_NUMEL // (batch * width):,}"))
                break
    return out


def _budget(model, blocks, cfg) -> list[Pitfall]:
    budget = getattr(cfg, "memory_budget", None)
    if budget is None:
        return []
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    free = device_budget(device)
    if budget > free:
        return [Pitfall("budget_above_free_memory", f"memory_budget {budget / 2**30:.2f} GiB is more than "
                        f"{device} can hold now ({free / 2**30:.2f} GiB): plans that fit it can run out of memory",
                        f"set memory_budget <= {free:,} bytes, or leave it None to use what is free")]
    return []


def _first(obj, names):
    return next((getattr(obj, n) for n in names if getattr(obj, n, None) is not None), None)


CHECKS = (_batchnorm, _dropout_rng, _half_streams, _custom_inverse, _tiles, _budget)


class CommonPitfalls:
    """Finds configuration problems in a reversible model.

    ``check(model, trainer_or_config=None)``: the second argument may be a ``TrainingConfig``, a
    ``Trainer`` (its ``.config`` is read), a memory scheduler (its ``memory_budget``), or anything with
    such fields (``max_length`` / ``seq_len``, ``batch_size``, ``memory_budget``). Returns a list of
    ``Pitfall`` (empty when nothing was found).

    Example::

        for issue in CommonPitfalls().check(model, training_config):
            print(f"Warning: {issue.description}")
            print(f"Solution: {issue.solution}")
    """

    def check(self, model: nn.Module, trainer_or_config=None) -> list[Pitfall]:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        cfg = trainer_or_config
        if cfg is not None and not hasattr(cfg, "batch_size") and hasattr(cfg, "config"):
            cfg = cfg.config   # a Trainer
        blocks = _blocks(model)
        return [p for check in CHECKS for p in check(model, blocks, cfg)]
