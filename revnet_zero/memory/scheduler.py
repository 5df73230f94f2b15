"""Choose per-block memory policies from measured costs: fastest step whose peak fits a budget.

The planner is a multiple-choice knapsack: each block picks one policy (bytes kept, transient peak,
seconds, all measured by ``MemoryProfiler``); predicted peak = baseline + fixed + sum(kept) +
max(transient) must stay within the budget; the sum of seconds is minimised. It is solved exactly
by dynamic programming over bytes rounded up to 1/4096 of the budget (so rounding only ever
over-estimates), once for each possible largest-transient value.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..engine import POLICIES, ReversibleSequence
from .profiler import MemoryProfile, MemoryProfiler

GRANULARITY = {
    "layer": ("store", "recompute"),                                  # whole block kept or rebuilt
    "attention": ("store_attention", "offload_attention", "recompute"),  # keep attention only
    "block": POLICIES,                                                # any of them, per block
}
STRATEGIES = ("aggressive", "balanced", "adaptive")
MiB = 2**20


@dataclass
class Plan:
    policies: list[str]
    predicted_peak: int
    predicted_seconds: float
    budget: int
    profile: MemoryProfile
    measured_peak: int | None = None   # set by verified_plan: the peak of a step under this plan
    first_error: int | None = None     # measured - predicted peak of the first, unverified plan

    def explain(self) -> str:
        rows = ["block | policy            | kept MiB | transient MiB | seconds",
                "------|-------------------|----------|---------------|--------"]
        for i, (p, c) in enumerate(zip(self.policies, self.profile.costs)):
            k = c[p]
            rows.append(f"{i:5d} | {p:17s} | {k.kept_bytes / MiB:8.1f} | {k.transient_bytes / MiB:13.1f} | "
                        f"{k.seconds:.4f}")
        rows.append(f"predicted peak {self.predicted_peak / MiB:.0f} MiB (budget {self.budget / MiB:.0f} MiB; "
                    f"baseline {self.profile.baseline_bytes / MiB:.0f}, fixed {self.profile.fixed_bytes / MiB:.0f}), "
                    f"predicted step {self.predicted_seconds:.4f} s"
                    + (f"; measured peak {self.measured_peak / MiB:.0f} MiB" if self.measured_peak else ""))
        return "\n".join(rows)


def plan(profile: MemoryProfile, budget: int, allowed: Sequence[str] = POLICIES,
         fixed: dict[int, str] | None = None) -> Plan:
    """The fastest per-block policies (from ``allowed``; ``fixed`` blocks keep theirs) with predicted
    peak <= ``budget`` bytes. Raises ValueError when even the least-memory choice does not fit."""
    fixed = fixed or {}
    n = len(profile.costs)
    choices = [[fixed[i]] if i in fixed else [p for p in allowed if p in profile.costs[i]] for i in range(n)]
    for i, ch in enumerate(choices):
        if not ch:
            raise ValueError(f"block {i} has no measured policy among {list(allowed)}")
    room = budget - profile.baseline_bytes - profile.fixed_bytes
    best: tuple[float, list[str]] | None = None
    for cap in sorted({profile.costs[i][p].transient_bytes for i in range(n) for p in choices[i]}):
        opts = [[p for p in choices[i] if profile.costs[i][p].transient_bytes <= cap] for i in range(n)]
        if all(opts) and room - cap >= 0:
            found = _knapsack(profile, opts, room - cap)
            if found is not None and (best is None or found[0] < best[0]):
                best = found
    if best is None:
        least = [min(ch, key=lambda p, i=i: profile.costs[i][p].kept_bytes) for i, ch in enumerate(choices)]
        need = profile.predict(least)[0]
        raise ValueError(f"no policy assignment fits the budget of {budget / MiB:.0f} MiB: the least-memory "
                         f"one needs {need / MiB:.0f} MiB (allowed policies {list(allowed)})")
    peak, seconds = profile.predict(best[1])
    return Plan(best[1], peak, seconds, budget, profile)


def verified_plan(profile: MemoryProfile, budget: int, measure, allowed: Sequence[str] = POLICIES,
                  fixed: dict[int, str] | None = None, tries: int = 3) -> Plan:
    """``plan``, then one measured step (``measure(policies) -> peak bytes``) to check it. The profile
    prices each block alone; neighbours interact a little (run boundaries, prefetches), so when the
    measured peak exceeds the budget the plan is redone with the room reduced by the overshoot. The
    returned plan's ``measured_peak`` is within the budget, or ValueError says by how much it is not.
    The room is cut by at least the last plan's own underestimate, so the next plan differs.
    """
    correction, last = 0, None
    for _ in range(tries):
        p = plan(profile, budget - correction, allowed, fixed)
        peak = measure(p.policies)
        p.measured_peak, p.first_error = peak, (last.first_error if last else peak - p.predicted_peak)
        if peak <= budget or peak == 0:
            return p
        correction = max(correction + peak - budget, peak - p.predicted_peak)
        last = p
    raise ValueError(f"no verified plan within {budget / MiB:.0f} MiB after {tries} tries: the last measured "
                     f"{last.measured_peak / MiB:.0f} MiB ({(last.measured_peak - budget) / MiB:.0f} MiB over)")


def _knapsack(profile: MemoryProfile, opts: list[list[str]], room: int):
    unit = max(1, math.ceil(room / 4096))
    units = room // unit          # capacity in units, rounded down: never more than the room
    inf = float("inf")
    cost = [inf] * (units + 1)   # cost[c]: least seconds so far using c units of kept bytes
    cost[0] = 0.0
    picks: list[list] = []
    for i, ch in enumerate(opts):
        new, pick = [inf] * (units + 1), [None] * (units + 1)
        for p in ch:
            c = profile.costs[i][p]
            w = math.ceil(c.kept_bytes / unit)
            for used in range(units + 1 - w):
                if cost[used] + c.seconds < new[used + w]:
                    new[used + w], pick[used + w] = cost[used] + c.seconds, (p, used)
        cost = new
        picks.append(pick)
    end = min(range(units + 1), key=lambda c: cost[c])
    if cost[end] == inf:
        return None
    total, policies = cost[end], []
    for pick in reversed(picks):
        p, end = pick[end]
        policies.append(p)
    return total, policies[::-1]


def device_budget(device: torch.device | str) -> int:
    """What this process can hold: free device memory plus what its allocator already reserves,
    less 5% for fragmentation. On CPU, the available physical memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.95 * (free + torch.cuda.memory_reserved(device)))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _sequence_group(model: nn.Module | None):
    """The process group ``model``'s sequence is split over (``enable_sequence_parallel``), or None."""
    if model is None:
        return None
    sp = next((m.sequence_parallel for m in model.modules()
               if getattr(m, "sequence_parallel", None) is not None), None)
    return sp.group if sp is not None and sp.size > 1 else None


def _gathered(value, group) -> list:
    """``value`` from every rank of ``group`` (``[value]`` without one)."""
    if group is None:
        return [value]
    import torch.distributed as dist
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def _from_first(value, group):
    """The group's first rank's ``value`` on every rank (``value`` itself without a group)."""
    return value if group is None else _gathered(value, group)[0]


def _sequence(model: nn.Module) -> ReversibleSequence:
    seqs = [m for m in model.modules() if isinstance(m, ReversibleSequence)]
    if len(seqs) != 1:
        raise ValueError(f"a scheduler needs a model with exactly one ReversibleSequence, found {len(seqs)}")
    return seqs[0]


class MemoryScheduler:
    """Plans and applies per-block policies for the input shape it sees.

    ``strategy``: ``'aggressive'`` (least memory: recompute everywhere), ``'adaptive'`` (the fastest
    plan that fits ``memory_budget``, default: what the device has free), ``'balanced'`` (a budget
    halfway between the two). ``recompute_granularity``: ``'layer'`` (store or recompute whole blocks),
    ``'attention'`` (keep only attention outputs, on the GPU or in host memory), ``'block'`` (any).
    Inside ``with scheduler:`` the first forward with a new input shape first profiles the model on
    that batch (a few extra steps whose gradients are discarded), then plans; ``scheduler.plan``
    then holds the plan and ``scheduler.plan.explain()`` its table.

    Example::

        scheduler = MemoryScheduler(model, strategy='adaptive', recompute_granularity='block')
        with scheduler:
            loss = model(input_ids).loss
        loss.backward()
        print(scheduler.plan.explain())
    """

    def __init__(self, model: nn.Module, strategy: str = "adaptive", recompute_granularity: str = "block",
                 memory_budget: int | None = None, profile: MemoryProfile | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if recompute_granularity not in GRANULARITY:
            raise ValueError(f"recompute_granularity must be one of {tuple(GRANULARITY)}, got "
                             f"{recompute_granularity!r}")
        if memory_budget is not None and memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        self.model, self.seq = model, _sequence(model)
        self.strategy, self.allowed = strategy, GRANULARITY[recompute_granularity]
        self.memory_budget, self.profile = memory_budget, profile
        self.plan: Plan | None = None
        self._hook = None
        self._busy = False
        if profile is not None:
            self._plan_for(profile)

    def _budget(self, profile: MemoryProfile) -> int:
        least = plan(profile, 2**62, ("recompute",) if "recompute" in self.allowed else self.allowed)
        if self.strategy == "aggressive":
            return least.predicted_peak
        full = self.memory_budget if self.memory_budget is not None else device_budget(profile.device)
        return full if self.strategy == "adaptive" else (least.predicted_peak + full) // 2

    def _plan_for(self, profile: MemoryProfile, profiler: MemoryProfiler | None = None, batch=None) -> Plan:
        # Ranks that split one sequence (sequence parallelism) must run the same policies: a block that
        # recomputes repeats its attention collectives, so different plans would pair mismatched
        # collectives (a hang or wrong data). Timings and free memory differ per rank, so every rank
        # plans from the group's first rank's profile, the smallest budget and the largest measured peak.
        group = _sequence_group(self.model)
        profile = _from_first(profile, group)
        self.profile = profile
        budget = min(_gathered(self._budget(profile), group))
        if profiler is not None and profile.device.startswith("cuda"):
            self.plan = verified_plan(profile, budget,
                                      lambda policies: max(_gathered(profiler.measure_peak(batch, policies), group)),
                                      self.allowed, self._fixed())
        else:
            self.plan = plan(profile, budget, self.allowed, self._fixed())
        self._apply(self.plan.policies)
        return self.plan

    def _fixed(self) -> dict[int, str]:
        return {}

    def _apply(self, policies: Sequence[str]) -> None:
        for block, p in zip(self.seq.blocks, policies):
            block.policy = p

    def _pre_forward(self, module, args, kwargs):
        if self._busy or not torch.is_grad_enabled():
            return
        ids = args[0] if args else kwargs.get("input_ids")
        if self.profile is not None and tuple(ids.shape) == self.profile.input_shape:
            return
        self._busy = True
        try:
            profiler = MemoryProfiler(self.model, self.allowed + ("recompute",))
            self._plan_for(profiler.profile(ids), profiler, ids)
        finally:
            self._busy = False

    def __enter__(self):
        self._hook = self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._hook.remove()
        return False

    @property
    def recomputed_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.seq.blocks) if b.policy != "store"]

    @property
    def memory_saved(self) -> int:
        """Predicted bytes saved against keeping every activation (``store`` everywhere)."""
        if self.profile is None or self.plan is None:
            return 0
        stored = sum(c["store"].kept_bytes for c in self.profile.costs if "store" in c)
        return stored - sum(c[p].kept_bytes for c, p in zip(self.profile.costs, self.plan.policies))


class AdaptiveScheduler(MemoryScheduler):
    """``MemoryScheduler`` with an explicit budget. ``recompute_strategy``: ``'selective'`` (any
    policy per block), ``'attention'`` (kept attention or recompute), ``'full'`` (recompute only)."""

    STRATEGY_GRANULARITY = {"selective": "block", "attention": "attention", "full": None}

    def __init__(self, model: nn.Module, memory_budget: int | None = None, profile: MemoryProfile | None = None,
                 recompute_strategy: str = "selective"):
        if recompute_strategy not in self.STRATEGY_GRANULARITY:
            raise ValueError(f"recompute_strategy must be one of {tuple(self.STRATEGY_GRANULARITY)}, "
                             f"got {recompute_strategy!r}")
        gran = self.STRATEGY_GRANULARITY[recompute_strategy]
        super().__init__(model, "aggressive" if gran is None else "adaptive", gran or "block", memory_budget, None)
        if profile is not None:
            self._plan_for(profile)


class LayerScheduler(MemoryScheduler):
    """Fixed policies for chosen blocks; blocks set to ``'adaptive'`` are planned against
    ``memory_budget`` once a profile exists (until then they recompute, and ``explain`` says so).

    Example::

        s = LayerScheduler()
        s.set_policy(layers=range(0, 6), policy='store')
        s.set_policy(layers=range(6, 24), policy='recompute')
        model.set_scheduler(s)
    """

    def __init__(self, memory_budget: int | None = None):
        self.rules: dict[int, str] = {}
        self.memory_budget, self.profile, self.plan = memory_budget, None, None
        self.strategy, self.allowed = "adaptive", POLICIES
        self.model = self.seq = self._hook = None
        self._busy = False

    def set_policy(self, layers: Iterable[int], policy: str) -> LayerScheduler:
        if policy not in POLICIES + ("adaptive",):
            raise ValueError(f"policy must be one of {POLICIES + ('adaptive',)}, got {policy!r}")
        for i in layers:
            if not isinstance(i, int) or i < 0:
                raise ValueError(f"layers must be non-negative block indices, got {i!r}")
            self.rules[i] = policy
        return self

    def _fixed(self) -> dict[int, str]:
        return {i: p for i, p in self.rules.items() if p != "adaptive"}

    def apply(self, model: nn.Module) -> None:
        self.model, self.seq = model, _sequence(model)
        n = len(self.seq.blocks)
        bad = [i for i in self.rules if i >= n]
        if bad:
            raise ValueError(f"layer indices {bad} out of range for a model with {n} blocks")
        self._apply([self.rules.get(i, "recompute") if self.rules.get(i) != "adaptive" else "recompute"
                     for i in range(n)])

    def explain(self) -> str:
        if self.plan is not None:
            return self.plan.explain()
        adaptive = sorted(i for i, p in self.rules.items() if p == "adaptive")
        lines = [f"block {i}: {b.policy}" for i, b in enumerate(self.seq.blocks)] if self.seq else []
        if adaptive:
            lines.append(f"blocks {adaptive} are 'adaptive': they recompute until a profile is measured "
                         "(enter `with scheduler:` for a training step)")
        return "\n".join(lines)


def set_scheduler(model: nn.Module, scheduler: MemoryScheduler) -> None:
    """Apply a scheduler's policies to ``model`` (what ``model.set_scheduler`` calls)."""
    if isinstance(scheduler, LayerScheduler):
        scheduler.apply(model)
    elif scheduler.plan is not None:
        scheduler._apply(scheduler.plan.policies)
    else:
        raise ValueError("this scheduler has no plan yet: pass profile=..., or use it as `with scheduler:`")
