"""Recommendations computed from a measured memory profile of the user's model on the user's device.

``OptimizationAdvisor`` profiles the model (``MemoryProfiler``: every policy, one step each) at two
short probe lengths, fits each cost as ``a + b * tokens`` (exact for everything the engine keeps:
streams, kept attention output and logsumexp, stored activations of position-wise layers; SDPA
kernels keep no S x S tensor), and extrapolates to the target length. From that it plans the fastest
policies that fit the memory budget (``memory.scheduler.plan``), and finds the longest sequence and
the largest batch that fit. Step times are extrapolated linearly too, which underestimates attention
(quadratic in S) — they are used only to rank policies, never quoted as a prediction at the target.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine import KEPT_ATTENTION, POLICIES, ReversibleSequence
from ..layers.coupling_layers import StepCoupling
from ..memory.profiler import LayerCost, MemoryProfile, MemoryProfiler
from ..memory.scheduler import device_budget, plan

GiB = 2**30


@dataclass
class Recommendation:
    category: str            # 'memory_policy', 'sequence_length', 'batch_size', 'attention'
    suggestion: str          # what to do, in words
    expected_gain: str       # what it buys, with the figures it rests on
    numbers: dict = field(default_factory=dict)   # the inputs of the computation
    applicable: bool = False  # apply_recommendations can apply it


def _sequence(model: nn.Module) -> ReversibleSequence:
    seqs = [m for m in model.modules() if isinstance(m, ReversibleSequence)]
    if len(seqs) != 1:
        raise ValueError(f"OptimizationAdvisor needs a model with exactly one ReversibleSequence, found {len(seqs)}")
    return seqs[0]


def _lerp(c1: LayerCost, c2: LayerCost, n1: int, n2: int, n: int) -> LayerCost:
    """The cost at ``n`` tokens on the line through the costs at ``n1`` and ``n2`` (never below zero)."""
    def line(a, b):
        return max(0.0, a + (b - a) * (n - n1) / (n2 - n1))
    return LayerCost(int(line(c1.kept_bytes, c2.kept_bytes)), int(line(c1.transient_bytes, c2.transient_bytes)),
                     line(c1.forward_s, c2.forward_s), line(c1.backward_s, c2.backward_s))


def extrapolate(p1: MemoryProfile, p2: MemoryProfile, tokens: int) -> MemoryProfile:
    """A profile at ``tokens`` (batch x sequence) from profiles measured at two smaller token counts."""
    n1, n2 = _tokens(p1), _tokens(p2)
    costs = [{k: _lerp(a[k], b[k], n1, n2, tokens) for k in a} for a, b in zip(p1.costs, p2.costs)]
    fixed = max(0, int(p1.fixed_bytes + (p2.fixed_bytes - p1.fixed_bytes) * (tokens - n1) / (n2 - n1)))
    other = p1.other_seconds + (p2.other_seconds - p1.other_seconds) * (tokens - n1) / (n2 - n1)
    return MemoryProfile((1, tokens), p1.device, p2.baseline_bytes, fixed, costs, max(0.0, other))


def saved_step_bytes(model: nn.Module, input_ids, policies: list[str] | None = None) -> int:
    """Bytes of distinct storages that one training forward of ``model`` saves for backward, parameters
    excluded (with ``policies`` set on the blocks for the step, then restored)."""
    seq = _sequence(model)
    old = [b.policy for b in seq.blocks]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    try:
        for b, p in zip(seq.blocks, policies or old):
            b.policy = p
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids)
        del out
    finally:
        for b, p in zip(seq.blocks, old):
            b.policy = p
    return sum(seen.values())


def _tokens(p: MemoryProfile) -> int:
    return p.input_shape[0] * p.input_shape[1]


class OptimizationAdvisor:
    """What to change so that ``model`` trains at ``target_seq_length``, and what it buys.

    ``memory_budget``: bytes the step may use (default: what the device can hold now, ``device_budget``).
    ``probe_lengths``: the two short sequence lengths measured. ``state_bytes_per_param``: bytes per
    parameter held outside the step on CPU, where no allocator reports them (4 for the gradient; add 8
    for AdamW's two moments); on CUDA the profile measures them. ``policies``: those the plan may use
(default: every policy the model's couplings support). On CPU the byte figures are those saved for
backward (the backward's working set is measured on CUDA only). ``analyze()`` returns ``Recommendation``s;
    ``apply_recommendations(model)`` sets the planned per-block policies and lists the change in
    ``advisor.changes``.

    Example::

        advisor = OptimizationAdvisor(model, target_seq_length=256, memory_budget=2**30)
        for rec in advisor.analyze():
            print(f"{rec.category}: {rec.suggestion} ({rec.expected_gain})")
        model = advisor.apply_recommendations(model)
    """

    def __init__(self, model: nn.Module, target_seq_length: int, batch_size: int = 1,
                 memory_budget: int | None = None, probe_lengths: tuple[int, int] = (32, 64),
                 state_bytes_per_param: int = 4, policies: tuple[str, ...] | None = None):
        for name, v in (("target_seq_length", target_seq_length), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if len(probe_lengths) != 2 or not 1 <= probe_lengths[0] < probe_lengths[1]:
            raise ValueError(f"probe_lengths must be two increasing positive lengths, got {probe_lengths!r}")
        if memory_budget is not None and memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        self.model, self.seq = model, _sequence(model)
        self.config = getattr(model, "config", None)
        if getattr(self.config, "vocab_size", None) is None:
            raise ValueError("OptimizationAdvisor probes with random token ids: the model needs a .config "
                             "with vocab_size (a ReversibleTransformer / ReversibleGPT / ReversibleBERT)")
        self.target, self.batch_size, self.probe_lengths = target_seq_length, batch_size, probe_lengths
        self.device = next(model.parameters()).device
        self.memory_budget = memory_budget if memory_budget is not None else device_budget(self.device)
        self.state_bytes_per_param = state_bytes_per_param
        unknown = set(policies or ()) - set(POLICIES)
        if unknown or (policies is not None and "recompute" not in policies):
            raise ValueError(f"policies must include 'recompute' and come from {POLICIES}, got {policies!r}")
        self.policies = policies
        self.plan = None
        self.changes: list[str] = []

    def _allowed(self) -> tuple[str, ...]:
        if self.policies is not None:
            return tuple(self.policies)
        steps = all(isinstance(b.coupling, StepCoupling) for b in self.seq.blocks)
        return POLICIES if steps else tuple(p for p in POLICIES if p not in KEPT_ATTENTION)

    def _weights_bytes(self) -> int:
        """Parameters plus their per-parameter state: measured by the allocator on CUDA, counted on CPU."""
        if self.device.type == "cuda":
            return 0
        n = sum(p.numel() * p.element_size() for p in self.model.parameters())
        grads = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return n + grads * self.state_bytes_per_param

    def profile_at(self, tokens: int) -> MemoryProfile:
        """The extrapolated profile at ``tokens`` tokens per step (profiles are measured once)."""
        if not hasattr(self, "_probes"):
            profiler = MemoryProfiler(self.model, self._allowed())
            vocab = self.config.vocab_size
            self._probes = [profiler.profile(torch.randint(0, vocab, (1, s), device=self.device))
                            for s in self.probe_lengths]
            for p, s in zip(self._probes, self.probe_lengths):
                p.baseline_bytes += self._weights_bytes()
                if self.device.type != "cuda":   # no allocator: count what the step saves outside the blocks
                    ids = torch.randint(0, vocab, (1, s), device=self.device)
                    p.fixed_bytes = max(0, saved_step_bytes(self.model, ids) - sum(c["recompute"].kept_bytes
                                                                                  for c in p.costs))
        return extrapolate(*self._probes, tokens)

    def analyze(self) -> list[Recommendation]:
        tokens = self.batch_size * self.target
        prof = self.profile_at(tokens)
        allowed = self._allowed()
        least = plan(prof, 2**62, ("recompute",))
        recs = []
        try:
            self.plan = plan(prof, self.memory_budget, allowed)
            recs.append(self._policy_rec(least))
        except ValueError as e:
            self.plan = None
            recs.append(Recommendation("memory_policy", f"no policy plan fits: {e}",
                                       "none: shorten the sequence or the batch (see below)",
                                       {"budget_bytes": self.memory_budget, "least_bytes": least.predicted_peak}))
        recs.append(self._longest_rec())
        recs.append(self._batch_rec())
        recs.append(self._attention_rec())
        return recs

    def _policy_rec(self, least) -> Recommendation:
        p = self.plan
        counts = {k: p.policies.count(k) for k in dict.fromkeys(p.policies)}
        speed = least.predicted_seconds / p.predicted_seconds if p.predicted_seconds > 0 else 1.0
        return Recommendation(
            "memory_policy", f"per-block policies {counts} (block by block: {p.policies})",
            f"predicted peak {p.predicted_peak / GiB:.3f} GiB within the budget {self.memory_budget / GiB:.3f} GiB; "
            f"{speed:.2f}x the predicted speed of recomputing every block",
            {"policies": p.policies, "predicted_peak_bytes": p.predicted_peak, "budget_bytes": self.memory_budget,
             "recompute_all_peak_bytes": least.predicted_peak, "seq_len": self.target, "batch": self.batch_size},
            applicable=True)

    def _slope(self) -> tuple[int, float]:
        """``(intercept, bytes per token)`` of the least-memory plan's peak."""
        a = plan(self.profile_at(self.probe_lengths[0]), 2**62, ("recompute",)).predicted_peak
        b = plan(self.profile_at(self.probe_lengths[1]), 2**62, ("recompute",)).predicted_peak
        per_token = (b - a) / (self.probe_lengths[1] - self.probe_lengths[0])
        return int(a - per_token * self.probe_lengths[0]), per_token

    def _longest_rec(self) -> Recommendation:
        base, per_token = self._slope()
        longest = int((self.memory_budget - base) / per_token) // self.batch_size if per_token > 0 else 0
        limit = getattr(self.config, "max_seq_len", None)
        fits = longest >= self.target
        text = (f"the longest sequence that fits at batch {self.batch_size} (every block recomputing) is "
                f"{longest:,} tokens" + ("" if limit is None or longest <= limit else
                                         f"; raise max_seq_len (now {limit:,}) to use it"))
        return Recommendation("sequence_length", text,
                              f"target {self.target:,} {'fits' if fits else 'does NOT fit'}",
                              {"bytes_per_token": per_token, "fixed_bytes": base, "budget_bytes": self.memory_budget,
                               "longest_seq_len": longest, "max_seq_len": limit})

    def _batch_rec(self) -> Recommendation:
        base, per_token = self._slope()
        largest = int((self.memory_budget - base) / (per_token * self.target)) if per_token > 0 else 0
        return Recommendation("batch_size", f"the largest batch that fits at {self.target:,} tokens is {largest}",
                              f"{largest / self.batch_size:.1f}x the tokens per step of batch {self.batch_size}",
                              {"bytes_per_token": per_token, "fixed_bytes": base, "largest_batch": largest})

    def _attention_rec(self) -> Recommendation:
        """Exact SDPA attention is what the models run; name the variant fields that exist, if any."""
        variant = next((getattr(self.config, k) for k in ("attention", "attention_type", "attention_variant")
                        if hasattr(self.config, k)), None)
        numbers = {"device": str(self.device), "attention_field": variant}
        if self.device.type == "cuda":
            kernel = ("keep exact SDPA attention (flash / cuDNN / efficient back ends); to pin one, time them "
                      "on this GPU and wrap the step in torch.nn.attention.sdpa_kernel(...)")
            gain = "speed only: no back end keeps an S x S matrix, so the memory figures above hold for all"
        else:
            kernel = "no GPU: SDPA runs its CPU kernel; the kernel choice changes nothing here"
            gain = "none on CPU"
        if variant is not None:
            kernel = f"attention variant in use: {variant!r}; " + kernel
        return Recommendation("attention", kernel, gain, numbers)

    def apply_recommendations(self, model: nn.Module | None = None) -> nn.Module:
        """Set the planned policy on every block of ``model`` (default: the advised one); what changed
        is listed in ``self.changes``. Returns the model."""
        model = self.model if model is None else model
        if self.plan is None:
            self.analyze()
        seq = _sequence(model)
        self.changes = []
        if self.plan is None:
            return model
        if len(seq.blocks) != len(self.plan.policies):
            raise ValueError(f"the plan has {len(self.plan.policies)} blocks, the model {len(seq.blocks)}")
        for i, (b, p) in enumerate(zip(seq.blocks, self.plan.policies)):
            if b.policy != p:
                self.changes.append(f"block {i}: {b.policy} -> {p}")
                b.policy = p
        return model

