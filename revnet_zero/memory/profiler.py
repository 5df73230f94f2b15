"""Measured per-block costs of each memory policy: bytes kept, transient peak, seconds.

``MemoryProfiler(model).profile(sample_batch)`` runs one training step per policy. In each step one
block of every group of identical blocks (same structure and parameter shapes) takes the policy and
the others recompute; hooks read, around each block, the allocator (``torch.cuda.memory_allocated``
and ``max_memory_allocated``) and CUDA events. On CPU, bytes are those of the tensors the block keeps
for backward (saved-tensor hooks plus kept attention) and the transient peak is not measured.
Profiling steps use ``torch.autograd.grad``, so no ``.grad`` is touched.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..engine import POLICIES, ReversibleBlock, ReversibleSequence, trusted_hooks


@dataclass
class LayerCost:
    kept_bytes: int          # held from the block's forward until its backward
    transient_bytes: int     # peak during the block's backward above what was live when it began
    forward_s: float
    backward_s: float

    @property
    def seconds(self) -> float:
        return self.forward_s + self.backward_s


@dataclass
class MemoryProfile:
    """Costs per block and policy for one input shape, and what a step holds besides the blocks."""

    input_shape: tuple[int, ...]
    device: str
    baseline_bytes: int                    # allocated before the step (weights, grads, optimizer state)
    fixed_bytes: int                       # the rest of the step's peak (streams, loss, gradients of the streams)
    costs: list[dict[str, LayerCost]] = field(default_factory=list)   # [block][policy]
    other_seconds: float = 0.0             # step time outside the blocks (embedding, loss, head)

    def predict(self, policies: Sequence[str]) -> tuple[int, float]:
        """Predicted ``(peak_bytes, step_seconds)`` of a step with these per-block policies."""
        if len(policies) != len(self.costs):
            raise ValueError(f"{len(policies)} policies for {len(self.costs)} blocks")
        chosen = [c[p] for c, p in zip(self.costs, policies)]
        peak = (self.baseline_bytes + self.fixed_bytes + sum(c.kept_bytes for c in chosen)
                + max(c.transient_bytes for c in chosen))
        return peak, self.other_seconds + sum(c.seconds for c in chosen)


def _signature(block: nn.Module) -> tuple:
    return (repr(block), tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters()))


class _Clock:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b) / 1e3
        return b - a


def _storage_bytes(ts) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts if isinstance(t, Tensor)}


class MemoryProfiler:
    """Measures, for each block of ``model`` and each policy, what it keeps and what it costs.

    Example::

        profile = MemoryProfiler(model).profile(sample_batch)     # sample_batch: input_ids [B, S]
        profile.costs[0]['recompute'].kept_bytes
    """

    def __init__(self, model: nn.Module, policies: Sequence[str] = POLICIES, loss_fn=None):
        seqs = [m for m in model.modules() if isinstance(m, ReversibleSequence)]
        if len(seqs) != 1:
            raise ValueError(f"MemoryProfiler needs a model with exactly one ReversibleSequence, found {len(seqs)}")
        unknown = set(policies) - set(POLICIES)
        if unknown:
            raise ValueError(f"unknown policies {sorted(unknown)}; known: {POLICIES}")
        self.model, self.seq, self.policies = model, seqs[0], list(policies)
        self.loss_fn = loss_fn or (lambda m, batch: (m(**batch) if isinstance(batch, dict) else m(batch)).loss)

    def profile(self, sample_batch) -> MemoryProfile:
        blocks = list(self.seq.blocks)
        saved_policies = [b.policy for b in blocks]
        groups: dict[tuple, list[int]] = {}
        for i, b in enumerate(blocks):
            groups.setdefault(_signature(b), []).append(i)
        probe_of = {i: idx[len(idx) // 2] for idx in groups.values() for i in idx}  # a middle block
        probes = sorted(set(probe_of.values()))
        ids = sample_batch["input_ids"] if isinstance(sample_batch, dict) else sample_batch
        cuda = ids.is_cuda
        try:
            self._step(sample_batch, blocks, {}, cuda)   # warm-up: kernels, allocator, autotuning
            base = self._step(sample_batch, blocks, {}, cuda)
            steps = {"recompute": base}
            for p in self.policies:
                if p != "recompute":
                    steps[p] = self._step(sample_batch, blocks, {i: p for i in probes}, cuda)
        finally:
            for b, p in zip(blocks, saved_policies):
                b.policy = p
        costs = [{p: st["layers"][i if p == "recompute" else probe_of[i]] for p, st in steps.items()}
                 for i in range(len(blocks))]
        kept = sum(c["recompute"].kept_bytes for c in costs)
        transient = max(c["recompute"].transient_bytes for c in costs)
        fixed = max(0, base["peak"] - base["baseline"] - kept - transient) if cuda else 0
        block_s = sum(c["recompute"].seconds for c in costs)
        return MemoryProfile(tuple(ids.shape), str(ids.device), base["baseline"], fixed, costs,
                             max(0.0, base["step_s"] - block_s))

    def measure_peak(self, sample_batch, policies: Sequence[str]) -> int:
        """Measured peak bytes (``torch.cuda.max_memory_allocated``) of one step with these per-block
        policies; 0 on CPU. The blocks' policies are restored after."""
        blocks = list(self.seq.blocks)
        if len(policies) != len(blocks):
            raise ValueError(f"{len(policies)} policies for {len(blocks)} blocks")
        saved = [b.policy for b in blocks]
        ids = sample_batch["input_ids"] if isinstance(sample_batch, dict) else sample_batch
        try:
            return self._step(sample_batch, blocks, dict(enumerate(policies)), ids.is_cuda)["peak"]
        finally:
            for b, p in zip(blocks, saved):
                b.policy = p

    def _step(self, batch, blocks: list[ReversibleBlock], policies: dict[int, str], cuda: bool) -> dict:
        """One step with the given policies (others: recompute); per-block bytes, peaks, seconds."""
        for i, b in enumerate(blocks):
            b.policy = policies.get(i, "recompute")
        clock, n = _Clock(cuda), len(blocks)
        fwd: dict[int, dict] = {i: {} for i in range(n)}
        bnd: dict[int, tuple] = {}   # boundary k (inputs of block k; n = final output) -> backward reading

        def boundary(k):
            def hook(grad):
                # block k's backward ends here (peak since it began) and block k-1's begins
                bnd[k] = (clock.mark(), _peak(cuda), _mem(cuda))
                _reset(cuda)
            return hook

        def pre(i):
            def hook(module, args, kwargs):
                r = fwd[i]
                r["in"] = _storage_bytes(args[:2])
                if args[0].requires_grad:
                    args[0].register_hook(boundary(i))
                if cuda:
                    r["m0"] = torch.cuda.memory_allocated()
                else:
                    r["saved"] = {}
                    r["ctx"] = torch.autograd.graph.saved_tensors_hooks(
                        lambda t: r["saved"].update(_storage_bytes([t])) or t, lambda t: t)
                    r["ctx"].__enter__()
                r["t0"] = clock.mark()
            return hook

        def post(i):
            def hook(module, args, kwargs, out):
                r = fwd[i]
                r["t1"] = clock.mark()
                new_out = sum(nb for k, nb in _storage_bytes(out).items() if k not in r["in"])
                if cuda:
                    r["kept"] = torch.cuda.memory_allocated() - r["m0"] - new_out
                    if module.policy == "store":
                        # plain autograd keeps the block's input streams, which a recompute run
                        # would free after the next block (allocated before, so not in the delta)
                        r["kept"] += sum(r["in"].values())
                    store = getattr(out[0].grad_fn, "store", None)
                    if store is not None and store.offload:
                        # in a run of offloading blocks, the next block's kept attention is fetched
                        # back while this one is recomputed: one more copy on the GPU
                        r["prefetch"] = store.nbytes
                else:
                    r["ctx"].__exit__(None, None, None)
                    store = getattr(out[0].grad_fn, "store", None)
                    outs = _storage_bytes(out)  # a block's own outputs are alive anyway, not kept by it
                    r["kept"] = (sum(nb for k, nb in r["saved"].items() if k not in outs)
                                 + (store.nbytes if store is not None else 0))
                if i == n - 1 and out[0].requires_grad:
                    out[0].register_hook(boundary(n))
            return hook

        handles = [h for i, b in enumerate(blocks) for h in (
            b.register_forward_pre_hook(pre(i), with_kwargs=True),
            b.register_forward_hook(post(i), with_kwargs=True))]
        try:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            baseline = _mem(cuda)
            t0 = clock.mark()
            with trusted_hooks():   # the hooks above only read clocks and the allocator
                loss = self.loss_fn(self.model, batch)
            peak = _peak(cuda)
            params = [p for p in self.model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            t1 = clock.mark()
            peak = max([peak, _peak(cuda)] + [v[1] for v in bnd.values()])
            if cuda:
                torch.cuda.synchronize()
            del grads, loss
        finally:
            for h in handles:
                h.remove()
        layers = {}
        for i, r in fwd.items():
            start, end = bnd.get(i + 1), bnd.get(i)
            back_s = clock.seconds(start[0], end[0]) if start and end else 0.0
            transient = max(0, end[1] - start[2]) if cuda and start and end else 0
            transient += r.get("prefetch", 0)
            layers[i] = LayerCost(int(r.get("kept", 0)), int(transient), clock.seconds(r["t0"], r["t1"]), back_s)
        return {"layers": layers, "baseline": baseline, "peak": peak, "step_s": clock.seconds(t0, t1)}


def _mem(cuda: bool) -> int:
    return torch.cuda.memory_allocated() if cuda else 0


def _reset(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def _peak(cuda: bool) -> int:
    return torch.cuda.max_memory_allocated() if cuda else 0
