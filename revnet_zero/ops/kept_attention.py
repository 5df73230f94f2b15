"""Attention inside reversible blocks: one kernel for forward and recompute, or kept outputs.

At long context attention is most of a block's FLOPs. Under the ``store_attention`` policy a block's
forward records, for each attention call, the output ``[B, H, S, hd]`` and its logsumexp
``[B, H, S]`` (2*D + 4*H bytes per token); the recompute then runs only the projections, takes the
kept output in place of attention, and calls the SDPA backward kernel directly with the kept
tensors. ``offload_attention`` keeps them in pinned host memory instead, copied on a side stream
and fetched back one block ahead during backward.

Attention modules opt in by calling ``attention(q, k, v, ...)`` below instead of
``F.scaled_dot_product_attention``; with no store active it is exactly SDPA.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import Tensor

aten = torch.ops.aten
_STORE: contextvars.ContextVar[AttentionStore | None] = contextvars.ContextVar("revnet_attention_store",
                                                                               default=None)
# SDPA kernels the reversible path may call directly on CUDA for bf16/fp16 (float32: efficient only).
CUDA_BACKENDS = ("cudnn", "flash")


class AttentionStore:
    """The kept attention outputs of one block forward, in call order.

    With ``offload`` the kept tensors live in pinned host memory; ``prefetch`` starts copying them
    back on a side stream, and ``pop`` hands out the device copy once and forgets it, so at most
    the blocks being recomputed hold kept attention on the GPU.
    """

    def __init__(self, offload: bool = False, keep: bool = True):
        self.offload, self.keep = offload, keep
        self.entries: list[dict] = []   # {'kept': (out, lse), 'meta': ..., 'device': (out, lse) or None}
        self.cursor = 0
        self.recording = True

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.entries for t in e["kept"])

    def push(self, out: Tensor, lse: Tensor, meta: tuple) -> None:
        kept = tuple(_to_host(out, lse)) if self.offload and out.is_cuda else (out, lse)
        self.entries.append({"kept": kept, "meta": meta, "device": None})

    def prefetch(self) -> None:
        """Start copying offloaded entries back to the GPU on the side stream; an event per entry
        marks when its copy is done."""
        for e in self.entries:
            if e["device"] is None and not e["kept"][0].is_cuda and torch.cuda.is_available():
                e["device"] = tuple(_to_device(*e["kept"]))
                e["ready"] = torch.cuda.Event()
                e["ready"].record(_side_stream())

    def pop(self) -> tuple[Tensor, Tensor, tuple]:
        if self.cursor >= len(self.entries):
            raise RuntimeError(f"kept attention: the recompute made more attention calls than the forward "
                               f"({len(self.entries)})")
        e = self.entries[self.cursor]
        self.cursor += 1
        if e["kept"][0].is_cuda or not torch.cuda.is_available():
            return (*e["kept"], e["meta"])
        if e["device"] is None:
            self.prefetch()
        out, lse = e["device"]
        e["device"] = None  # used once per backward: the host copy stays for retain_graph
        # wait for this entry's copy only: the side stream may already hold the next block's prefetch
        torch.cuda.current_stream().wait_event(e.pop("ready"))
        out.record_stream(torch.cuda.current_stream())
        lse.record_stream(torch.cuda.current_stream())
        return out, lse, e["meta"]

    def clear(self) -> None:
        self.entries.clear()


_SIDE: dict[int, torch.cuda.Stream] = {}


def _side_stream() -> torch.cuda.Stream:
    dev = torch.cuda.current_device()
    if dev not in _SIDE:
        _SIDE[dev] = torch.cuda.Stream(dev)
    return _SIDE[dev]


def _to_host(*ts: Tensor) -> list[Tensor]:
    side = _side_stream()
    side.wait_stream(torch.cuda.current_stream())
    out = []
    with torch.cuda.stream(side):
        for t in ts:  # same strides as on the GPU: the backward kernels expect the forward's layout
            h = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            t.record_stream(side)  # keep t's memory until the copy is done
            out.append(h)
    return out


def _to_device(*ts: Tensor) -> list[Tensor]:
    side = _side_stream()
    with torch.cuda.stream(side):
        return [t.to("cuda", non_blocking=True) for t in ts]


@contextlib.contextmanager
def using_store(store: AttentionStore | None, recording: bool):
    if store is not None:
        store.recording, store.cursor = recording, 0
    token = _STORE.set(store)
    try:
        yield store
    finally:
        _STORE.reset(token)


def keeping() -> bool:
    """True inside a block forward or recompute whose policy keeps attention outputs
    (``store_attention`` / ``offload_attention``)."""
    store = _STORE.get()
    return store is not None and store.keep


def attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, dropout_p: float = 0.0,
              scale: float | None = None, cuda_backend: str = "cudnn", ring=None) -> Tensor:
    """``F.scaled_dot_product_attention`` on ``[B, H, S, hd]`` (k, v may have fewer heads: GQA).

    Inside a reversible block (an ``AttentionStore`` is active) it records or replays: a keeping
    store keeps the output and logsumexp; a non-keeping one (the ``recompute`` policy, on CUDA)
    runs the same SDPA kernel in forward and in the recompute, so the rebuilt streams are not
    perturbed by two kernels' different roundings (SDPA may pick another kernel, or another
    variant of one, when gradients are needed). ``cuda_backend`` names that kernel for bf16/fp16 on
    CUDA: ``'cudnn'`` (default) or ``'flash'`` (see docs/results.md for how they compare).

    ``ring`` (a ``revnet_zero.distributed.SequenceParallel`` in mode ``'ring'``): q, k, v are this
    rank's shard of the sequence and every kernel call above becomes a ring over the group
    (``distributed/ring.py``), with or without a store.
    """
    if cuda_backend not in CUDA_BACKENDS:
        raise ValueError(f"cuda_backend must be one of {CUDA_BACKENDS}, got {cuda_backend!r}")
    gqa = k.shape[1] != q.shape[1]
    store = _STORE.get()
    plain = ring is None and (store is None or (not store.keep and (dropout_p or not q.is_cuda)))
    if plain:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                              **({"enable_gqa": True} if gqa else {}))
    if dropout_p and ring is not None:
        raise ValueError(f"ring sequence parallelism runs attention without dropout, got attention dropout "
                         f"{dropout_p}; set attention_dropout=0 or use mode='all_to_all'")
    if dropout_p:
        raise ValueError(f"kept attention (store_attention/offload_attention) needs attention dropout 0, "
                         f"got {dropout_p}; use the 'recompute' policy with attention dropout")
    if gqa:  # the kernels below take equal head counts; autograd sums dk, dv over each group
        g = q.shape[1] // k.shape[1]
        k, v = (t.transpose(1, 2).repeat_interleave(g, dim=2).transpose(1, 2) for t in (k, v))
    # one fixed layout for every kernel call, forward and backward
    q, k, v = bshd(q), bshd(k), bshd(v)
    if store is None:   # the ring outside a reversible block: plain autograd or inference
        out, lse, meta = _forward(q.detach(), k.detach(), v.detach(), is_causal, scale, cuda_backend, ring)
        return _KeptAttention.apply(q, k, v, out, lse, meta, is_causal, scale)
    if store.recording:
        out, lse, meta = _forward(q, k, v, is_causal, scale, cuda_backend, ring)
        if store.keep:
            store.push(out, lse, meta)
        return out
    if store.keep:
        out, lse, meta = store.pop()
    else:
        out, lse, meta = _forward(q.detach(), k.detach(), v.detach(), is_causal, scale, cuda_backend, ring)
    return _KeptAttention.apply(q, k, v, out, lse, meta, is_causal, scale)


def bshd(t: Tensor) -> Tensor:
    """``t`` ``[B, H, S, hd]`` laid out as ``[B, S, H, hd]`` in memory (a copy only when it is not).

    The projections write this layout, the SDPA kernels take it natively (cuDNN, flash and
    efficient on CUDA, flash on CPU) and write their output and gradients in it, so q, k, v, the
    output and its gradient pass between projections and kernel with no transposing copy (a
    ``[B, H, S, hd]``-contiguous layout costs one copy of v, of the output and of its gradient).
    """
    return t if t.transpose(1, 2).is_contiguous() else t.transpose(1, 2).contiguous().transpose(1, 2)


def _backend(q: Tensor, cuda_backend: str) -> str:
    if not q.is_cuda:
        return "cpu"
    return cuda_backend if q.dtype in (torch.float16, torch.bfloat16) else "efficient"  # fp32: efficient only


def _forward(q, k, v, is_causal, scale, cuda_backend, ring=None):
    backend = _backend(q, cuda_backend)
    if ring is not None:
        from ..distributed.ring import ring_forward
        return ring_forward(ring, q, k, v, is_causal, scale, backend)
    if backend == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
        return out, lse, ("cpu",)
    if backend == "cudnn":
        r = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, is_causal, False, scale=scale)
        return r[0], r[1], ("cudnn", r[2], r[3], r[4], r[5], r[6], r[7])
    if backend == "efficient":
        r = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, is_causal, scale=scale)
        return r[0], r[1], ("efficient", r[2], r[3])
    if backend == "flash":
        r = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)
        return r[0], r[1], ("flash", r[2], r[3], r[4], r[5], r[6], r[7])
    raise ValueError(f"cuda_backend must be one of {CUDA_BACKENDS}, got {backend!r}")


class _KeptAttention(torch.autograd.Function):
    """Returns the kept output; backward calls the SDPA backward kernel with it."""

    @staticmethod
    def forward(ctx, q, k, v, out, lse, meta, is_causal, scale):
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta, ctx.is_causal, ctx.scale = meta, is_causal, scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        meta, causal, scale = ctx.meta, ctx.is_causal, ctx.scale
        if dout.stride() != out.stride():  # the kernels expect dout laid out like out
            dout = torch.empty_strided(out.shape, out.stride(), dtype=dout.dtype, device=dout.device).copy_(dout)
        if meta[0] == "ring":
            from ..distributed.ring import ring_backward
            dq, dk, dv = ring_backward(meta, dout, q, k, v, out, lse, causal, scale)
        elif meta[0] == "cpu":
            dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout, q, k, v, out, lse, 0.0, causal, scale=scale)
        elif meta[0] == "efficient":
            seed, offset = meta[1:]
            dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
                dout, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False], causal, scale=scale)
        elif meta[0] == "flash":
            cq, ck, mq, mk, seed, offset = meta[1:]
            dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, out, lse, cq, ck, mq, mk, 0.0, causal, seed, offset, scale=scale)
        else:
            cq, ck, mq, mk, seed, offset = meta[1:]
            dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
                dout, q, k, v, out, lse, seed, offset, None, cq, ck, mq, mk, 0.0, causal, scale=scale)
        return dq, dk, dv, None, None, None, None, None
