"""A memory study of the reversible engine: policies, couplings, and how memory scales with length and depth.

Every figure is measured in the run that reports it and says how: on CUDA the step's peak
(``torch.cuda.max_memory_allocated`` above weights and gradients), on CPU the bytes autograd saves for
backward (``saved_tensors_hooks``); policy comparisons use ``MemoryProfiler``'s per-block kept bytes.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ..memory import MemoryProfiler
from ..models import PRESETS, ReversibleGPT, TransformerConfig
from ..training import compare_policies as step_memory

POLICIES = ("recompute", "store_attention", "offload_attention", "store")
COUPLINGS = ("additive", "affine")


@dataclasses.dataclass
class ResearchConfig:
    model_size: str = "tiny"             # a TransformerConfig preset: the width, heads and vocabulary
    seq_length: int = 128                # tokens per sequence for the policy and coupling comparisons
    batch_size: int = 1                  # sequences per measured step
    device: str | None = None            # None: cuda if available, else cpu
    seed: int = 0                        # weights and token ids

    def __post_init__(self):
        if self.model_size not in PRESETS:
            raise ValueError(f"model_size must be one of {sorted(PRESETS)}, got {self.model_size!r}")
        if not isinstance(self.seq_length, int) or self.seq_length < 2:
            raise ValueError(f"seq_length must be an int >= 2 (one next-token target), got {self.seq_length!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 for a single point)."""
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


class MemoryEfficientResearch:
    """Compare memory policies and couplings, and measure how memory scales with length and depth.

    Keyword arguments are the fields of ``ResearchConfig``. ``run(out_dir)`` does all three studies and
    writes ``memory_study.json`` and ``memory_study.png`` (the plot needs matplotlib).

    Example::

        study = MemoryEfficientResearch(model_size="tiny", seq_length=128)
        laws = study.test_scaling_laws(seq_lengths=[64, 128, 256], num_layers=[2, 4])
        print(laws["bytes_per_token"], laws["bytes_per_layer"])
        study.plot(laws, "scaling.png")
    """

    def __init__(self, **options):
        self.config = ResearchConfig(**options)
        self.device = torch.device(self.config.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _model(self, num_layers: int, seq_length: int, coupling: str = "additive") -> ReversibleGPT:
        torch.manual_seed(self.config.seed)
        cfg = TransformerConfig.preset(self.config.model_size, num_layers=num_layers, coupling=coupling,
                                       max_seq_len=max(seq_length, PRESETS[self.config.model_size]["max_seq_len"]))
        return ReversibleGPT(cfg).to(self.device)

    def _ids(self, model: ReversibleGPT, seq_length: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.config.seed)
        ids = torch.randint(0, model.config.vocab_size, (self.config.batch_size, seq_length), generator=g)
        return ids.to(self.device)

    def compare_policies(self, num_layers: int = 4) -> list[dict]:
        """Per policy on every block: the bytes all blocks keep for backward and the predicted step seconds
        (``MemoryProfiler``, the scheduler's own measurements)."""
        model = self._model(num_layers, self.config.seq_length)
        profile = MemoryProfiler(model, POLICIES).profile(self._ids(model, self.config.seq_length))
        rows = []
        for policy in POLICIES:
            kept = sum(c[policy].kept_bytes for c in profile.costs)
            _, seconds = profile.predict([policy] * len(profile.costs))
            rows.append({"policy": policy, "kept_bytes": kept, "predicted_step_s": seconds,
                         "measure": "block kept bytes (MemoryProfiler)"})
        return rows

    def compare_couplings(self, num_layers: int = 4) -> list[dict]:
        """Per coupling: step memory trained reversibly and as plain autograd, and one step's seconds."""
        rows = []
        for coupling in COUPLINGS:
            model = self._model(num_layers, self.config.seq_length, coupling)
            ids = self._ids(model, self.config.seq_length)
            mem = step_memory(model, ids)
            t0 = time.perf_counter()
            model(ids).loss.backward()
            if ids.is_cuda:
                torch.cuda.synchronize(ids.device)
            rows.append({"coupling": coupling, "reversible_bytes": mem["reversible"],
                         "standard_bytes": mem["standard"], "step_s": time.perf_counter() - t0,
                         "measure": mem["measure"]})
        return rows

    def test_scaling_laws(self, seq_lengths=(64, 128, 256), num_layers=(2, 4)) -> dict:
        """Step memory, reversible and standard, at every (depth, length); fitted: bytes per token (slope over
        length at the largest depth) and bytes per layer (slope over depth at the longest length)."""
        for name, values in (("seq_lengths", seq_lengths), ("num_layers", num_layers)):
            if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise ValueError(f"{name} must be ints, got {list(values)!r}")
        seq_lengths, num_layers = sorted(set(seq_lengths)), sorted(set(num_layers))
        if not seq_lengths or not num_layers or min(seq_lengths) < 2 or min(num_layers) < 1:
            raise ValueError(f"need lengths >= 2 and depths >= 1, got {seq_lengths} and {num_layers}")
        rows = []
        for layers in num_layers:
            model = self._model(layers, max(seq_lengths))
            for seq in seq_lengths:
                mem = step_memory(model, self._ids(model, seq))
                rows.append({"layers": layers, "seq_length": seq, "reversible_bytes": mem["reversible"],
                             "standard_bytes": mem["standard"], "measure": mem["measure"]})
        deep = [r for r in rows if r["layers"] == num_layers[-1]]
        long = [r for r in rows if r["seq_length"] == seq_lengths[-1]]
        fit = {mode: {"per_token": _slope([r["seq_length"] for r in deep], [r[f"{mode}_bytes"] for r in deep]),
                      "per_layer": _slope([r["layers"] for r in long], [r[f"{mode}_bytes"] for r in long])}
               for mode in ("reversible", "standard")}
        return {"rows": rows, "measure": rows[0]["measure"],
                "bytes_per_token": {m: f["per_token"] for m, f in fit.items()},
                "bytes_per_layer": {m: f["per_layer"] for m, f in fit.items()}}

    def plot(self, laws: dict, path: str | Path) -> Path:
        """Memory against length, one line per mode and depth, from ``test_scaling_laws``'s result."""
        try:
            import matplotlib
        except ImportError as e:
            raise ImportError("the plot needs matplotlib: pip install 'revnet-zero[cli]'") from e
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for layers in sorted({r["layers"] for r in laws["rows"]}):
            rows = [r for r in laws["rows"] if r["layers"] == layers]
            for mode, style in (("standard", "o--"), ("reversible", "o-")):
                ax.plot([r["seq_length"] for r in rows], [r[f"{mode}_bytes"] / 2 ** 20 for r in rows], style,
                        label=f"{mode}, {layers} layers")
        ax.set(xlabel="tokens per sequence", ylabel=f"MiB ({laws['measure']})", title="Activation memory")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def run(self, out_dir: str | Path, seq_lengths=(64, 128, 256), num_layers=(2, 4)) -> dict:
        """All three studies; writes ``memory_study.json`` and ``memory_study.png`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        results = {"config": dataclasses.asdict(self.config), "device": str(self.device),
                   "policies": self.compare_policies(max(num_layers)),
                   "couplings": self.compare_couplings(max(num_layers)),
                   "scaling": self.test_scaling_laws(seq_lengths, num_layers)}
        (out / "memory_study.json").write_text(json.dumps(results, indent=1))
        self.plot(results["scaling"], out / "memory_study.png")
        return results
