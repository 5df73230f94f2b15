"""Ring attention for sequence parallelism, on PyTorch's context-parallel implementation.

PyTorch ships ring attention as part of its context parallelism
(``torch.distributed.tensor.experimental``): each rank keeps its queries, the key/value shards travel
round the ring, every step runs one SDPA kernel that returns its logsumexp, and the partial outputs
are merged by their logsumexps; backward is a second ring that also carries the key/value gradients
back to their owners. For causal attention the sequence is cut into ``2N`` chunks and rank ``r``
holds chunks ``r`` and ``2N - 1 - r`` (head-tail load balance), so every rank does the same work.

``torch``'s public entry (``context_parallel``) patches ``F.scaled_dot_product_attention`` globally
and routes it through DTensor for the time of a ``with`` block, which a reversible backward (the
recompute runs long after the forward's ``with`` block closed) cannot use. We call the ring
functions underneath it directly instead, with the SDPA kernel of the device and dtype, inside the
kernel-level attention path of ``ops/kept_attention.py``. So the ring runs in the forward, again in
the recompute, and its backward ring runs in the block's backward, under every memory policy; and
on CPU (the CPU flash kernel, gloo) the same ring code is tested against one process.

Key/value shards rotate by all-to-all (``permute_tensor``), one shard in flight at a time: memory for
keys and values stays ``O(S / N)`` per rank (the ``'all_gather'`` mode instead holds all of them).
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import Tensor

aten = torch.ops.aten
SEQ_DIM = 2   # q, k, v are [B, H, S, hd]


@functools.cache
def ring_api():
    """PyTorch's context-parallel attention module, or ValueError saying what this torch lacks."""
    cp = None
    for name in ("torch.distributed.tensor.experimental._context_parallel._attention",
                 "torch.distributed.tensor.experimental._attention"):
        try:
            cp = __import__(name, fromlist=["_templated_ring_attention"])
            break
        except ImportError:
            continue
    need = ("_templated_ring_attention", "_templated_ring_attention_backward", "_cp_options", "_RotateMethod")
    if cp is None or not all(hasattr(cp, n) for n in need) or \
            list(inspect.signature(cp._templated_ring_attention).parameters)[:3] != ["group", "seq_dim", "op"]:
        raise ValueError(f"mode='ring' runs PyTorch's context-parallel ring attention, which torch "
                         f"{torch.__version__} does not provide in the form used here (torch >= 2.9 does); "
                         "use mode='all_to_all' or mode='all_gather'")
    return cp


@contextlib.contextmanager
def _options(cp, load_balance: bool, dtype: torch.dtype):
    """torch keeps the ring's settings in one module-level object: set ours for the call, then restore."""
    o = cp._cp_options
    saved = (o.enable_load_balance, o.convert_to_f32, o.rotate_method)
    o.enable_load_balance = load_balance
    o.convert_to_f32 = dtype in (torch.float16, torch.bfloat16)   # merge half precision in fp32, fp64 in fp64
    o.rotate_method = cp._RotateMethod.ALL_TO_ALL
    try:
        yield
    finally:
        o.enable_load_balance, o.convert_to_f32, o.rotate_method = saved


def ring_forward(sp, q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float | None,
                 backend: str) -> tuple[Tensor, Tensor, tuple]:
    """Attention of this rank's queries over every rank's keys/values -> (out, logsumexp, meta).

    ``backend``: ``'cpu'`` (CPU flash kernel), ``'flash'``, ``'cudnn'`` or ``'efficient'`` (CUDA;
    float32 takes the efficient kernel). ``meta`` carries what the backward kernel needs.
    """
    cp = ring_api()
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"ring attention takes as many key/value heads as query heads, got "
                         f"q {tuple(q.shape)} and k {tuple(k.shape)}")
    if backend == "efficient":
        _check_efficient_length(q.shape[SEQ_DIM], sp.load_balance)
    op, kwargs = {
        "cpu": (aten._scaled_dot_product_flash_attention_for_cpu, {}),
        "flash": (aten._scaled_dot_product_flash_attention, {}),
        "efficient": (aten._scaled_dot_product_efficient_attention, {"attn_bias": None, "compute_log_sumexp": True}),
        "cudnn": (aten._scaled_dot_product_cudnn_attention, {"attn_bias": None, "compute_log_sumexp": True}),
    }[backend]
    with _options(cp, sp.load_balance, q.dtype):
        out, lse, *rest = cp._templated_ring_attention(sp.group, SEQ_DIM, op, q, k, v, is_causal=is_causal,
                                                       dropout_p=0.0, scale=scale, **kwargs)
    return out, lse, ("ring", sp, backend, tuple(rest))


def ring_backward(meta: tuple, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  is_causal: bool, scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of ``ring_forward`` (a second ring: key/value gradients travel back to their owners)."""
    _, sp, backend, rest = meta
    cp = ring_api()
    if backend == "cpu":
        op, name, kwargs = aten._scaled_dot_product_flash_attention_for_cpu_backward.default, "grad_out", {}
    elif backend == "efficient":
        seed, offset = rest[:2]
        op, name = aten._scaled_dot_product_efficient_attention_backward.default, "grad_out_"
        kwargs = {"attn_bias": None, "philox_seed": seed, "philox_offset": offset,
                  "grad_input_mask": [True, True, True, False]}
    else:   # flash and cuDNN return the same extras: cum_seq_q, cum_seq_k, max_q, max_k, seed, offset
        cq, ck, mq, mk, seed, offset = rest[:6]
        op = (aten._scaled_dot_product_flash_attention_backward if backend == "flash"
              else aten._scaled_dot_product_cudnn_attention_backward).default
        name = "grad_out"
        kwargs = {"cum_seq_q": cq, "cum_seq_k": ck, "max_q": mq, "max_k": mk, "philox_seed": seed,
                  "philox_offset": offset}
        if backend == "cudnn":
            kwargs["attn_bias"] = None
    with _options(cp, sp.load_balance, q.dtype):
        dq, dk, dv, *_ = cp._templated_ring_attention_backward(sp.group, SEQ_DIM, op, dout, name, q, k, v, out,
                                                               lse, is_causal, dropout_p=0.0, scale=scale,
                                                               **kwargs)
    return dq, dk, dv


def _check_efficient_length(local: int, load_balance: bool) -> None:
    """The efficient kernel's logsumexp is padded to a multiple of 32 positions, which the ring's
    merge cannot take: each query block must be a multiple of 32 long."""
    block = local // 2 if load_balance else local
    if block % 32:
        raise ValueError(f"ring attention in float32 on CUDA runs the memory-efficient kernel, whose logsumexp "
                         f"is padded to 32 positions: each rank's query chunks must be multiples of 32 long, got "
                         f"{block} (this rank holds {local} positions); use bfloat16/float16 (autocast) or a "
                         "longer sequence")
