"""Benchmark and diagnosis scripts of the source repository (not installed with the wheel).

Each is a module run from the repository root: ``python -m benchmarks.<name> --help``. The main runner
is part of the package: ``python -m revnet_zero.benchmarks.run`` or ``revnet-zero bench``.
"""
