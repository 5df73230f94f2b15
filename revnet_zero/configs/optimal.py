"""Configurations that were measured, not guessed: each preset is a row of a committed benchmark table.

For each (model size, hardware, training regime, sequence length) the preset is the planner's fastest
verified plan whose measured peak fitted the card (batch 1, bf16 autocast, as in the table). The rows
are copied here so the installed package needs no benchmark files; ``derive_presets`` turns a table's
JSON rows into these entries, and a test checks that the copy equals what it derives from the tables.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models.config import TransformerConfig

MODEL_SIZES = {"S": "S", "374M": "S"}      # accepted names -> TransformerConfig preset
HARDWARE = ("H100_80GB",)
REGIMES = ("pre-training",)
TABLES = {"H100_80GB": ("benchmarks/results/planner_h100-80gb-hbm3_2026-11-23.json",
                        "benchmarks/results/planner_256k_h100-80gb-hbm3_2026-11-23.json")}

# (model preset, hardware, regime) -> rows of derive_presets, shortest sequence first
PRESETS = {
    ("S", "H100_80GB", "pre-training"): [
        {"seq": 8192, "policies": {"store": 24}, "peak_gib": 11.90, "step_s": 0.0956, "commit": "b472a37",
         "source": "benchmarks/results/planner_h100-80gb-hbm3_2026-11-23.json"},
        {"seq": 32768, "policies": {"store": 24}, "peak_gib": 37.09, "step_s": 0.679, "commit": "b472a37",
         "source": "benchmarks/results/planner_h100-80gb-hbm3_2026-11-23.json"},
        {"seq": 131072, "policies": {"store": 11, "offload_attention": 13}, "peak_gib": 69.33, "step_s": 7.94,
         "commit": "b472a37", "source": "benchmarks/results/planner_h100-80gb-hbm3_2026-11-23.json"},
        {"seq": 262144, "policies": {"store_attention": 21, "store": 3}, "peak_gib": 56.46, "step_s": 30.8,
         "commit": "ceed0c4", "source": "benchmarks/results/planner_256k_h100-80gb-hbm3_2026-11-23.json"},
    ],
}


def derive_presets(rows_by_source: dict[str, list[dict]]) -> list[dict]:
    """For each sequence length, the fastest ``ok`` planner row (rounded as in ``PRESETS``)."""
    best: dict[int, dict] = {}
    for source, rows in rows_by_source.items():
        for r in rows:
            if r.get("status") != "ok":
                continue
            if r["seq"] not in best or r["step_s"] < best[r["seq"]]["step_s_exact"]:
                best[r["seq"]] = {"seq": r["seq"], "policies": dict(r["policies"]),
                                  "peak_gib": round(r["measured_peak_gib"], 2), "step_s_exact": r["step_s"],
                                  "step_s": float(f"{r['step_s']:.3g}"), "commit": r["commit"], "source": source}
    return [{k: v for k, v in best[s].items() if k != "step_s_exact"} for s in sorted(best)]


def granularity(policies: dict[str, int]) -> str:
    """The scheduler granularity that allows these policies (``MemoryScheduler(recompute_granularity=)``)."""
    used = set(policies)
    if used <= {"store", "recompute"}:
        return "layer"
    if used <= {"store_attention", "offload_attention", "recompute"}:
        return "attention"
    return "block"


@dataclass
class OptimalConfig:
    model_size: str
    hardware: str
    training_regime: str
    context_length: int          # the measured sequence length (>= the one asked for)
    num_layers: int
    d_model: int
    num_heads: int
    coupling_type: str           # the coupling the table's model used
    recompute_granularity: str   # 'layer', 'attention' or 'block': what the policies below need
    policies: dict[str, int]     # policy -> number of blocks, as measured
    measured_peak_gib: float     # torch.cuda.max_memory_allocated of the step
    step_seconds: float
    source: str                  # the table the row comes from
    commit: str

    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig.preset(MODEL_SIZES[self.model_size], max_seq_len=self.context_length)


class OptimalConfigs:
    """Measured presets.

    Example::

        config = OptimalConfigs.get_config(model_size="S", context_length=100_000, hardware="H100_80GB",
                                           training_regime="pre-training")
        config.policies, config.source        # ({'store': 11, 'offload_attention': 13}, 'benchmarks/...')
    """

    @staticmethod
    def get_config(model_size: str, context_length: int, hardware: str,
                   training_regime: str = "pre-training") -> OptimalConfig:
        if model_size not in MODEL_SIZES:
            raise ValueError(f"no measured preset for model_size={model_size!r}; known: {sorted(MODEL_SIZES)}")
        if hardware not in HARDWARE:
            raise ValueError(f"no benchmark table for hardware={hardware!r}; known: {list(HARDWARE)}")
        if training_regime not in REGIMES:
            raise ValueError(f"no measured preset for training_regime={training_regime!r}; known: {list(REGIMES)}")
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
            raise ValueError(f"context_length must be a positive int, got {context_length!r}")
        size = MODEL_SIZES[model_size]
        rows = PRESETS[(size, hardware, training_regime)]
        row = next((r for r in rows if r["seq"] >= context_length), None)
        if row is None:
            raise ValueError(f"context_length={context_length:,} is longer than any measured on {hardware} "
                             f"(longest {rows[-1]['seq']:,})")
        shape = TransformerConfig.preset(size)
        return OptimalConfig(model_size, hardware, training_regime, row["seq"], shape.num_layers, shape.d_model,
                             shape.num_heads, shape.coupling, granularity(row["policies"]), dict(row["policies"]),
                             row["peak_gib"], row["step_s"], row["source"], row["commit"])
