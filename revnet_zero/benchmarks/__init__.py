"""Benchmarks: one training step per model, mode and length; memory, speed and energy side by side.

The protocol is in the documentation's design notes ("Benchmark protocol"); the command line is
``python -m revnet_zero.benchmarks.run`` (its flags) over ``runner.py`` (what it does), also reached as
``revnet-zero bench ...`` through ``main(argv)``.

Example::

    from revnet_zero.benchmarks import BenchmarkSuite

    benchmark = BenchmarkSuite()
    results = benchmark.run(models={"reversible": model}, sequence_lengths=[1024, 4096],
                            batch_sizes=[2, 1], metrics=["memory", "throughput", "energy"])
    benchmark.plot_results(results, "benchmark_results.png")
"""
from __future__ import annotations

from .gradcheck import compare_grads
from .modes import MODES, PEER_MODES, PURE_MODES, all_modes, apply_mode, policy_modes
from .report import bytes_per_token, depth_ratios, plot_results, read_json, write_json
from .sdpa import fastest_backend, time_sdpa
from .suite import BenchmarkSuite

__all__ = ["BenchmarkSuite", "main", "MODES", "PEER_MODES", "PURE_MODES", "all_modes", "apply_mode", "bytes_per_token",
           "compare_grads", "depth_ratios", "fastest_backend", "plot_results", "policy_modes", "read_json", "time_sdpa",
           "write_json"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark runner with command-line arguments ``argv`` (``None``: ``sys.argv[1:]``) and
    return its exit status: the same as ``python -m revnet_zero.benchmarks.run ARGS``, whose parser this
    uses, so the flags and ``--help`` are the runner's own. ``revnet-zero bench ARGS`` calls this."""
    # imported here: ``python -m revnet_zero.benchmarks.run`` must not find that module already loaded
    from .run import main as run_main
    return run_main(list(argv) if argv is not None else None)
