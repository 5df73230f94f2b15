"""Benchmarks: one training step per model, mode and length; memory, speed and energy side by side.

The protocol is in ``shared/BENCHMARKS.md``; the runner is ``benchmarks/run.py``.

Example::

    from revnet_zero.benchmarks import BenchmarkSuite

    benchmark = BenchmarkSuite()
    results = benchmark.run(models={"reversible": model}, sequence_lengths=[1024, 4096],
                            batch_sizes=[2, 1], metrics=["memory", "throughput", "energy"])
    benchmark.plot_results(results, "benchmark_results.png")
"""
from .gradcheck import compare_grads
from .modes import MODES, PEER_MODES, PURE_MODES, all_modes, apply_mode, policy_modes
from .report import bytes_per_token, depth_ratios, plot_results, read_json, write_json
from .sdpa import fastest_backend, time_sdpa
from .suite import BenchmarkSuite

__all__ = ["BenchmarkSuite", "MODES", "PEER_MODES", "PURE_MODES", "all_modes", "apply_mode", "bytes_per_token",
           "compare_grads", "depth_ratios", "fastest_backend", "plot_results", "policy_modes", "read_json", "time_sdpa",
           "write_json"]
