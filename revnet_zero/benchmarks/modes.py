"""Ways to run one model's reversible stack, applied from outside the model.

Every mode runs the *same* ``ReversibleBlock`` objects (same weights, same attention and FFN code);
the modes differ only in how the stack is differentiated. ``apply_mode(model, mode)`` swaps
``model.blocks`` (a ``ReversibleSequence``) for a wrapper, or sets the blocks' policies, and puts
everything back on exit:

| mode | how the stack runs |
|---|---|
| ``standard`` | policy ``'store'``: plain autograd, every activation kept |
| ``full_ac`` | ``torch.utils.checkpoint(use_reentrant=False)`` around each block (Hugging Face's) |
| ``selective_ac`` | checkpointing that keeps every matmul and SDPA output, recomputes the rest (torchtitan's op |
| | list, without its every-second-mm skip) |
| ``ac_offload`` | ``full_ac`` with the checkpointed block inputs in pinned host memory (Unsloth / ALST) |
| ``memcnn``, ``revlib`` | the blocks' ``f``/``g`` stacked by those libraries (see ``peers.py``) |
| ``revnet_zero`` | policy ``'recompute'`` everywhere: the library's reversible backward |
| ``revnet_zero:<policy>`` | any other engine policy (``revnet_zero.engine.POLICIES``) on every block |
| ``full_ac:no_early_stop`` | ``full_ac`` whose recompute runs each block's whole forward (a diagnostic) |
| ``single_standard`` | the baseline users would otherwise train: a standard pre-norm transformer with ONE |
| | residual stream, ``x = x + F(x); x = x + G(x)`` per block, same F, G (attention kernel, FFN tiling), |
| | weights and loss; plain autograd. The stream is in the autocast dtype when autocast is on (bf16 on |
| | GPU, as a model trained in bf16 keeps it), else in the embedding's dtype. Additive couplings only. |
| ``single_full_ac`` | ``single_standard`` with ``torch.utils.checkpoint(use_reentrant=False)`` per block |

By default ``torch.utils.checkpoint`` stops a block's recompute as soon as the last tensor its backward
saved is rebuilt, so it never recomputes a block's final projection and residual add (their backward
needs only their inputs). A reversible backward must: the block's output is what it inverts.
``full_ac:no_early_stop`` turns the early stop off, so both recompute exactly one forward.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from .. import engine
from ..engine import ReversibleSequence
from ..layers.coupling_layers import AdditiveCoupling

PURE_MODES = ("standard", "full_ac", "selective_ac", "ac_offload", "revnet_zero")
PEER_MODES = ("memcnn", "revlib")
BASELINE_MODES = ("single_standard", "single_full_ac")
MODES = PURE_MODES + PEER_MODES + BASELINE_MODES
DIAGNOSTIC_MODES = ("full_ac:no_early_stop",)


def policy_modes() -> list[str]:
    """``revnet_zero:<policy>`` for every engine policy besides 'store' (= standard) and 'recompute'
    (= revnet_zero)."""
    return [f"revnet_zero:{p}" for p in engine.POLICIES if p not in ("store", "recompute")]


def all_modes() -> list[str]:
    return [*MODES, *policy_modes()]


def _sac_ops() -> list:
    """Ops whose outputs selective AC keeps: matmuls and every fused SDPA kernel that exists here."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu"]
    return [getattr(aten, n).default for n in names if hasattr(aten, n)]


class CheckpointedStack(nn.Module):
    """Runs a ``ReversibleSequence``'s blocks (in ``'store'`` policy) each under ``torch.utils.checkpoint``.

    ``selective``: keep matmul and SDPA outputs, recompute the rest. ``offload``: the tensors the
    checkpoints keep (each block's two input streams, ``[B, S, D]`` each) live in pinned host memory.
    """

    def __init__(self, seq: ReversibleSequence, selective: bool = False, offload: bool = False,
                 early_stop: bool = True):
        super().__init__()
        self.seq, self.selective, self.offload, self.early_stop = seq, selective, offload, early_stop
        ops = _sac_ops() if selective else None
        self._context_fn = functools.partial(create_selective_checkpoint_contexts, ops) if selective else None

    def forward(self, x1: Tensor, x2: Tensor | None = None, **kwargs) -> tuple[Tensor, Tensor]:
        x1, x2 = _stream_inputs(self.seq, x1, x2)
        extra = {"context_fn": self._context_fn} if self._context_fn is not None else {}
        offload = torch.autograd.graph.save_on_cpu(pin_memory=True) if self.offload else contextlib.nullcontext()
        with offload, torch.utils.checkpoint.set_checkpoint_early_stop(self.early_stop):
            for block in self.seq.blocks:
                x1, x2 = checkpoint(block, x1, x2, use_reentrant=False, **extra, **kwargs)
        return x1, x2


class SingleStreamStack(nn.Module):
    """The blocks' F and G as a standard pre-norm transformer with one residual stream ``[B, S, D]``:
    ``x = x + F(x); x = x + G(x)`` per block; returns ``(x, x)`` so the model's ``(y1 + y2) / 2`` is ``x``.

    ``checkpointed``: each block under ``torch.utils.checkpoint(use_reentrant=False)`` (keeps only the
    block's input stream). The stream is cast to the autocast dtype when autocast is on.
    """

    def __init__(self, seq: ReversibleSequence, checkpointed: bool = False):
        super().__init__()
        for i, block in enumerate(seq.blocks):
            c = block.coupling
            if not isinstance(c, AdditiveCoupling):
                raise ValueError(f"single-stream modes need additive couplings with f and g; block {i} has "
                                 f"{type(c).__name__}")
        self.seq, self.checkpointed = seq, checkpointed

    def forward(self, x1: Tensor, x2: Tensor | None = None, **kwargs) -> tuple[Tensor, Tensor]:
        x = x1
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        for block in self.seq.blocks:
            step = functools.partial(_single_block, block.coupling, **kwargs)
            x = checkpoint(step, x, use_reentrant=False) if self.checkpointed else step(x)
        return x, x


def _single_block(c: nn.Module, x: Tensor, **kwargs) -> Tensor:
    x = x + c.f(x, **kwargs).to(x.dtype)
    return x + c.g(x, **kwargs).to(x.dtype)


def _stream_inputs(seq: ReversibleSequence, x1: Tensor, x2: Tensor | None) -> tuple[Tensor, Tensor]:
    """The sequence's own input handling: ``x2`` defaults to ``x1``; streams cast to ``stream_dtype``."""
    if x2 is None:
        x2 = x1
    if seq.stream_dtype is not None:
        x1, x2 = x1.to(seq.stream_dtype), x2.to(seq.stream_dtype)
    return x1, x2


def stack_of(model: nn.Module) -> ReversibleSequence:
    seq = getattr(model, "blocks", None)
    if not isinstance(seq, ReversibleSequence):
        raise TypeError(f"benchmark modes need model.blocks to be a ReversibleSequence, got "
                        f"{type(seq).__name__} on {type(model).__name__}")
    return seq


def _policy_of(mode: str) -> str | None:
    """The engine policy a mode sets on every block, or None for modes that wrap the stack."""
    if mode == "standard":
        return "store"
    if mode == "revnet_zero":
        return "recompute"
    if mode.startswith("revnet_zero:"):
        policy = mode.split(":", 1)[1]
        if policy not in engine.POLICIES:
            raise ValueError(f"mode {mode!r}: unknown engine policy {policy!r}; the engine has {engine.POLICIES}")
        return policy
    return None


def check_mode(mode: str) -> None:
    if mode not in MODES + DIAGNOSTIC_MODES and not mode.startswith("revnet_zero:"):
        raise ValueError(f"unknown benchmark mode {mode!r}; expected one of {MODES + DIAGNOSTIC_MODES} "
                         "or 'revnet_zero:<policy>'")
    _policy_of(mode)


def _wrapper(mode: str, seq: ReversibleSequence) -> nn.Module:
    if mode in BASELINE_MODES:
        return SingleStreamStack(seq, checkpointed=mode == "single_full_ac")
    if mode in ("full_ac", "selective_ac", "ac_offload", "full_ac:no_early_stop"):
        return CheckpointedStack(seq, selective=mode == "selective_ac", offload=mode == "ac_offload",
                                 early_stop=mode != "full_ac:no_early_stop")
    from . import peers  # imported lazily: memcnn and revlib are optional
    return peers.MemcnnStack(seq) if mode == "memcnn" else peers.RevlibStack(seq)


@contextlib.contextmanager
def apply_mode(model: nn.Module, mode: str):
    """Run ``model`` in ``mode`` inside the ``with`` block; restores ``model.blocks`` and policies after.

    Example::

        with apply_mode(model, "full_ac"):
            model(ids).loss.backward()
    """
    check_mode(mode)
    seq = stack_of(model)
    saved = [b.policy for b in seq.blocks]
    policy = _policy_of(mode)
    try:
        seq.set_policy(policy if policy is not None else "store")
        if policy is None:
            model.blocks = _wrapper(mode, seq)
        yield model
    finally:
        model.blocks = seq
        for block, p in zip(seq.blocks, saved):
            block.policy = p
