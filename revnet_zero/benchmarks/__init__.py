"""Benchmarks: one training step per model, mode and length; memory, speed and energy side by side.

The protocol is in ``shared/BENCHMARKS.md``; the runner is ``benchmarks/run.py`` (its flags) over
``runner.py`` (what it does), also reached as ``revnet-zero bench ...`` through ``main(argv)``.

Example::

    from revnet_zero.benchmarks import BenchmarkSuite

    benchmark = BenchmarkSuite()
    results = benchmark.run(models={"reversible": model}, sequence_lengths=[1024, 4096],
                            batch_sizes=[2, 1], metrics=["memory", "throughput", "energy"])
    benchmark.plot_results(results, "benchmark_results.png")
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .gradcheck import compare_grads
from .modes import MODES, PEER_MODES, PURE_MODES, all_modes, apply_mode, policy_modes
from .report import bytes_per_token, depth_ratios, plot_results, read_json, write_json
from .sdpa import fastest_backend, time_sdpa
from .suite import BenchmarkSuite

__all__ = ["BenchmarkSuite", "main", "MODES", "PEER_MODES", "PURE_MODES", "all_modes", "apply_mode", "bytes_per_token",
           "compare_grads", "depth_ratios", "fastest_backend", "plot_results", "policy_modes", "read_json", "time_sdpa",
           "write_json"]

# The runner's command line lives in the repository's benchmarks/run.py, next to this package.
RUN_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark runner with command-line arguments ``argv`` (``None``: ``sys.argv[1:]``) and
    return its exit status: the same as ``python benchmarks/run.py ARGS``, whose parser this uses, so
    the flags and ``--help`` are the runner's own. ``revnet-zero bench ARGS`` calls this.

    The script is part of a source checkout (or an editable install), not of an installed wheel;
    without it this exits with a message saying so.
    """
    if not RUN_SCRIPT.is_file():
        raise SystemExit(f"the benchmark runner {RUN_SCRIPT} is not in this install: it ships with the "
                         "source repository; run revnet-zero bench from a checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location("revnet_zero_benchmarks_run", RUN_SCRIPT)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return run.main(list(argv) if argv is not None else None)
