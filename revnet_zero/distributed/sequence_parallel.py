"""Sequence parallelism: each rank of a process group holds ``S / N`` tokens of every sequence.

Everything position-wise (embedding, norms, projections, the FFN, the chunked head + loss) runs on the
local shard unchanged; only attention needs other ranks' tokens. Two exact ways to give it them:

* ``'all_to_all'`` (DeepSpeed-Ulysses): q, k, v ``[B, H, S/N, hd]`` (sequence shards) are exchanged
  into ``[B, H/N, S, hd]`` (head shards), attention runs over the whole sequence for ``H/N`` heads,
  and one more all-to-all brings the output back to sequence shards. Needs ``H % N == 0``; key/value
  heads are split the same way when ``Hkv % N == 0`` and repeated up to ``H`` otherwise (GQA with fewer
  key/value heads than ranks).
* ``'all_gather'`` (the key/value all-gather of Llama 3's context parallelism): each rank keeps its
  queries and gathers the keys and values of the ranks before it, then attends with a causal mask
  aligned to the lower right. Any head count; causal models only.
* ``'ring'`` (ring attention, PyTorch's context-parallel implementation; ``ring.py``): key/value
  shards travel round the ring one at a time and the partial outputs are merged by logsumexp, so a
  rank holds the shard in use and the one arriving, not all of them. Any head count, causal or not; causal
  sequences are cut into ``2N`` chunks and rank ``r`` holds chunks ``r`` and ``2N - 1 - r``, so the
  causal work is even over the ranks.

The collectives are functional collectives with autograd (``all_to_all_single_autograd``,
``all_gather_tensor_autograd``), called inside the attention sub-function: the reversible backward,
which re-runs each sub-function once, repeats them in the recompute and differentiates through them,
so nothing from the forward's communication is kept.

Gradients: each rank's parameters see the gradient of its own tokens' share of the loss. The model
scales its loss so that the *average* of the ranks' gradients is the full gradient, which is what DDP
and FSDP2 compute when they reduce over the group (``average_gradients`` does it for an unwrapped model).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

MODES = ("all_to_all", "all_gather", "ring")


class SequenceParallel:
    """Where a model's sequence is split: a process group (default: the whole world) and a mode.

    Attach with ``enable_sequence_parallel(model, ...)``; every rank of ``group`` then calls the model
    on the same full batch ``[B, S]`` (token ids are small), and each computes only its shard of
    ``S / N`` positions: rank ``r`` holds positions ``[r S/N, (r+1) S/N)``, or in ``'ring'`` mode
    with causal attention the chunks ``r`` and ``2N - 1 - r`` of ``2N`` (``local_spans``).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, mode: str = "all_to_all", causal: bool = True):
        if mode not in MODES:
            raise ValueError(f"sequence parallel mode must be one of {MODES}, got {mode!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("sequence parallelism needs torch.distributed initialised (torchrun, then "
                               "torch.distributed.init_process_group())")
        if mode == "ring":
            from .ring import ring_api
            ring_api()   # this torch has the ring functions, or a ValueError now rather than mid-step
        self.group = group if group is not None else dist.group.WORLD
        self.mode = mode
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        # head-tail chunks: even causal work per rank (one rank holds the whole sequence, in order)
        self.load_balance = mode == "ring" and causal and self.size > 1

    def __deepcopy__(self, memo):  # a process group is a handle: copies of a model share it
        return self

    def __copy__(self):
        return self

    def __reduce_ex__(self, protocol):
        # a process group lives in this process only; torch's own error names neither the model nor a way out
        raise TypeError(f"{self!r} holds a process group, which cannot be pickled (pickle.dumps / torch.save "
                        "of a model with sequence parallelism enabled): save model.state_dict(), or call "
                        "revnet_zero.distributed.disable_sequence_parallel(model) first")

    def __repr__(self) -> str:
        return f"SequenceParallel(mode={self.mode!r}, size={self.size}, rank={self.rank})"

    def local_spans(self, length: int) -> tuple[tuple[int, int], ...]:
        """This rank's positions of a sequence of ``length`` tokens, as ``(first, count)`` spans in the
        order the rank holds them."""
        parts = 2 * self.size if self.load_balance else self.size
        if length % parts:
            why = (f"ring sequence parallelism of a causal model over {self.size} ranks cuts it into {parts} "
                   "chunks (two per rank, for even work), so it" if self.load_balance else
                   f"sequence parallelism over {self.size} ranks")
            raise ValueError(f"{why} needs a sequence length divisible by {parts}, got {length}; pad the batch "
                             "or pick another length")
        n = length // parts
        if self.load_balance:
            return (self.rank * n, n), ((parts - 1 - self.rank) * n, n)
        return ((self.rank * n, n),)

    def shard(self, t: Tensor, dim: int = 1) -> Tensor:
        """This rank's positions of ``t`` along ``dim`` (the sequence)."""
        pieces = [t.narrow(dim, first, n) for first, n in self.local_spans(t.shape[dim])]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)

    def check_same_batch(self, input_ids: Tensor, targets: Tensor | None = None) -> None:
        """ValueError unless every rank of the group passed the same ``[B, S]`` ids (and loss targets):
        each rank would otherwise compute its shard of a different sequence, and the loss would silently
        mix them. Compares fingerprints (shape, sum, position-weighted sum) in one all-reduce of 16 ints."""
        fp = torch.cat([_fingerprint(input_ids), _fingerprint(targets) if targets is not None
                        else torch.zeros(4, dtype=torch.int64, device=input_ids.device)])
        extreme = torch.cat([fp, -fp])
        dist.all_reduce(extreme, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(extreme[:8], -extreme[8:]):   # the largest and the smallest differ somewhere
            raise ValueError(f"sequence parallelism: rank {self.rank} of {self.size} got input_ids "
                             f"{tuple(input_ids.shape)} (or labels, attention_mask) that differ from another "
                             "rank's; every rank of the group must pass the same full batch (each computes "
                             "only its own positions of it)")

    def check_heads(self, num_heads: int) -> None:
        if self.mode == "all_to_all" and num_heads % self.size:
            raise ValueError(f"all_to_all sequence parallelism splits the {num_heads} attention heads over "
                             f"{self.size} ranks, which needs num_heads % {self.size} == 0; use "
                             "mode='all_gather' (any head count)")

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over the group (no autograd: for counts and logged values)."""
        t = t.detach().clone()
        dist.all_reduce(t, group=self.group)
        return t


def _fingerprint(t: Tensor) -> Tensor:
    """[B, S, sum, position-weighted sum] of an integer ``[B, S]`` tensor, int64 on its device (no host sync)."""
    flat = t.reshape(-1).to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, device=t.device, dtype=torch.int64)
    shape = torch.tensor([t.shape[0], t.shape[-1]], dtype=torch.int64, device=t.device)
    return torch.cat([shape, flat.sum()[None], (flat * weights).sum()[None]])


def enable_sequence_parallel(model: torch.nn.Module, group: dist.ProcessGroup | None = None,
                             mode: str = "all_to_all") -> SequenceParallel:
    """Split ``model``'s sequences over the ranks of ``group`` (see ``SequenceParallel``).

    ``model`` is a ``ReversibleTransformer`` / ``ReversibleGPT`` (or anything whose attention modules
    are ``SelfAttention``). Every rank of the group must call the model together, with the same
    ``input_ids``; ``out.loss`` is the loss of the whole batch on every rank, and the model's gradients,
    averaged over the group (DDP, FSDP2 or ``average_gradients``), are those of one process running
    the whole sequence. ``mode``: ``'all_to_all'``, ``'all_gather'`` or ``'ring'`` (module docstring).

    Example (inside each process of ``torchrun --nproc-per-node 4``)::

        sp = enable_sequence_parallel(model, mode="all_to_all")
        model = torch.nn.parallel.DistributedDataParallel(model)
        loss = model(input_ids).loss          # input_ids [B, S], S divisible by 4
        loss.backward()                        # DDP averages: the full-sequence gradient
    """
    from ..layers.reversible_attention import SelfAttention
    attns = [m for m in model.modules() if isinstance(m, SelfAttention)]
    if not attns:
        raise TypeError(f"{type(model).__name__} has no SelfAttention modules to split the sequence for")
    config = getattr(model, "config", None)
    sp = SequenceParallel(group, mode, causal=all(m.causal for m in attns))
    if mode == "ring" and any(m.attention_dropout for m in attns):
        raise ValueError(f"mode='ring' runs attention without dropout, got attention_dropout="
                         f"{max(m.attention_dropout for m in attns)}; set it to 0 or use mode='all_to_all'")
    if mode == "all_gather" and config is not None and not getattr(config, "causal", True):
        raise ValueError("mode='all_gather' is for causal models; a bidirectional encoder needs "
                         "mode='all_to_all'")
    for m in attns:
        if type(m).forward is not SelfAttention.forward:
            raise ValueError(f"sequence parallelism splits exact softmax attention; {type(m).__name__} "
                             "(attention='" + str(getattr(config, "attention", "?")) + "') is not supported "
                             "yet: use attention='softmax'")
        sp.check_heads(m.num_heads)
    # every module that shards by it: the attention modules and the model that cuts its inputs, also
    # when ``model`` is a wrapper around it (DDP), which would otherwise feed each rank the whole sequence
    for m in model.modules():
        if hasattr(m, "sequence_parallel"):
            m.sequence_parallel = sp
    model.sequence_parallel = sp
    return sp


def disable_sequence_parallel(model: torch.nn.Module) -> None:
    """Undo ``enable_sequence_parallel``: every rank runs whole sequences again."""
    for m in model.modules():
        if hasattr(m, "sequence_parallel"):
            m.sequence_parallel = None


def average_gradients(model: torch.nn.Module, sp: SequenceParallel) -> None:
    """Average ``.grad`` over the group, for a model that no DDP/FSDP2 wrapper reduces."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=sp.group)   # a sum: gloo has no AVG reduction
            p.grad.div_(sp.size)


# --------------------------------------------------------------------------- attention
def _fc():
    import torch.distributed._functional_collectives as fc
    return fc


def seq_to_heads(x: Tensor, sp: SequenceParallel) -> Tensor:
    """``[B, H, S/N, hd]`` sequence shard -> ``[B, H/N, S, hd]`` head shard (all-to-all)."""
    B, H, L, hd = x.shape
    n = sp.size
    send = x.reshape(B, n, H // n, L, hd).transpose(0, 1).contiguous()        # (N dest, B, H/N, L, hd)
    recv = _fc().all_to_all_single_autograd(send.flatten(), None, None, sp.group)
    recv = recv.view(n, B, H // n, L, hd)                                      # (N src = seq chunk, ...)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, H // n, n * L, hd)


def heads_to_seq(y: Tensor, sp: SequenceParallel) -> Tensor:
    """``[B, H/N, S, hd]`` head shard -> ``[B, H, S/N, hd]`` sequence shard (all-to-all)."""
    B, h, S, hd = y.shape
    n = sp.size
    send = y.reshape(B, h, n, S // n, hd).permute(2, 0, 1, 3, 4).contiguous()  # (N dest = seq chunk, ...)
    recv = _fc().all_to_all_single_autograd(send.flatten(), None, None, sp.group)
    recv = recv.view(n, B, h, S // n, hd)                                       # (N src = head group, ...)
    return recv.transpose(0, 1).reshape(B, n * h, S // n, hd)


def gather_seq(x: Tensor, sp: SequenceParallel) -> Tensor:
    """``[B, H, S/N, hd]`` on every rank -> ``[B, H, S, hd]`` (all-gather along the sequence)."""
    fc = _fc()   # torch >= 2.10 names it all_gather_single_autograd (gather_dim 0 only)
    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    return gather(x.movedim(2, 0).contiguous(), 0, sp.group).movedim(0, 2)


def repeat_kv(k: Tensor, num_heads: int) -> Tensor:
    """Key/value heads ``[B, Hkv, S, hd]`` repeated group-wise to ``num_heads`` (GQA -> MHA layout)."""
    g = num_heads // k.shape[1]
    return k if g == 1 else k.repeat_interleave(g, dim=1)
