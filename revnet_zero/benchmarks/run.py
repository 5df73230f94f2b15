"""The benchmark runner (protocol: docs/design-notes.md, "Benchmark protocol"): modes side by side, SDPA
back ends, gradient check, longest context. Built to live inside a hard 10-minute command: every finished
row is written at once (JSON and markdown), a mode stops at its first out-of-memory, rows predicted to
overrun ``--max-seconds`` are skipped (and run by the next call with ``--resume-from``).

Writes ``<topic>_<gpu>_<date>.md`` and ``.json`` (+ ``_memory.png`` and ``_throughput.png`` when a sweep
ran) into ``--out``; prints the tables last. Run as ``python -m revnet_zero.benchmarks.run`` or
``revnet-zero bench``. Examples (see benchmarks/README.md)::

    python -m revnet_zero.benchmarks.run --config S --modes standard,full_ac,revnet_zero --lengths 8192,32768 --out $OUT
    python -m revnet_zero.benchmarks.run --sdpa-backends 32768,131072 --check-grads 8192 --out $OUT
"""
from __future__ import annotations

import argparse
import os
import sys
import time

T0 = time.monotonic()   # --max-seconds counts from here


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="S", help="TransformerConfig preset: tiny, S, M, llama8b (default S)")
    p.add_argument("--layers", default=None, help="comma list of depths, e.g. 4,24 (default: the preset's)")
    p.add_argument("--modes", default="", help="comma list of modes (revnet_zero.benchmarks.MODES, or "
                   "'revnet_zero:<policy>'); 'all' = every mode and engine policy; empty = no sweep")
    p.add_argument("--lengths", default="8192,16384,32768", help="comma list of sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ffn-chunk", type=int, default=None, help="positions per FFN tile (default: the preset's)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps below --long-tokens (median)")
    p.add_argument("--long-tokens", type=int, default=262144, help="from here: one timed step")
    p.add_argument("--long-warmup-tokens", type=int, default=16384, help="warm-up length for those long rows")
    p.add_argument("--offload-max-host-gib", type=float, default=64,
                   help="skip ac_offload rows that would pin more host memory than this")
    p.add_argument("--optimizer", action="store_true", help="include an AdamW step (and its state)")
    p.add_argument("--optimizer-in-backward", action="store_true",
                   help="include AdamW stepped per parameter during backward (OptimizerInBackward): the "
                        "gradients are freed block by block")
    p.add_argument("--peer-max-len", type=int, default=32768, help="memcnn/revlib only up to this length")
    p.add_argument("--sdpa", default="auto", help="SDPA back end for every mode: auto (fastest measured), "
                   "default (PyTorch's choice), flash, cudnn, efficient, math")
    p.add_argument("--sdpa-backends", default="", help="comma list of lengths: time SDPA flash / cuDNN / "
                   "efficient there (B=1, 16 heads, head dim 64, bf16, causal)")
    p.add_argument("--check-grads", type=int, default=0, help="length at which to compare each pure mode's "
                   "gradients with 'standard' (bf16 on CUDA)")
    p.add_argument("--grad-modes", default="", help="modes to check (default: every pure mode and engine policy)")
    p.add_argument("--grad-layers", type=int, default=None, help="depth for --check-grads (default: the preset's)")
    p.add_argument("--max-context", default="", help="comma list of modes: longest length that fits "
                   "(doubling, then bisection)")
    p.add_argument("--max-context-layers", type=int, default=None, help="depth for --max-context (default: "
                   "the preset's)")
    p.add_argument("--max-context-start", type=int, default=65536)
    p.add_argument("--max-context-limit", type=int, default=2 ** 21)
    p.add_argument("--max-context-granularity", type=int, default=65536)
    p.add_argument("--out", default="benchmarks/results", help="folder for the results")
    p.add_argument("--topic", default=None, help="file name prefix (default: what ran: modes, sdpa, ...)")
    p.add_argument("--resume-from", default=None, help="a results .json of an earlier call: its rows are "
                   "kept and not re-run, its SDPA choice reused")
    p.add_argument("--max-seconds", type=float, default=540, help="own time budget, from process start")
    p.add_argument("--device", default=None, help="cuda (default if available) or cpu")
    p.add_argument("--commit", default=None, help="commit to record (the GPU machine's copy has no .git)")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="let PyTorch use at most this much GPU memory (78.4 stands in for an 80 GB H100)")
    p.add_argument("--alloc-conf", default="expandable_segments:True",
                   help="PYTORCH_CUDA_ALLOC_CONF if unset ('' leaves PyTorch's default)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.alloc_conf and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf  # before CUDA starts
    from . import runner
    return runner.main(args, deadline=T0 + args.max_seconds)


if __name__ == "__main__":
    sys.exit(main())
