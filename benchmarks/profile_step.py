"""Where one training step's time goes, per mode: torch.profiler tables for the GPU machine.

    python -m benchmarks.profile_step --config S --seq 8192 --modes standard,full_ac,revnet_zero

For each mode: one warm-up step, then one profiled step. Prints the step's wall time, the GPU's busy
time (sum of kernel times) and the top kernels by GPU time, so host-side overhead (GPU idle while
Python launches work) shows as wall time well above busy time.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from revnet_zero.benchmarks.measure import random_ids, train_step
from revnet_zero.benchmarks.modes import apply_mode
from revnet_zero.benchmarks.sdpa import sdpa_context
from revnet_zero.models import ReversibleTransformer, TransformerConfig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="S")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--modes", default="standard,full_ac,revnet_zero")
    p.add_argument("--sdpa", default="cudnn")
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args(argv)
    over = {"max_seq_len": a.seq} | ({"num_layers": a.layers} if a.layers else {})
    model = ReversibleTransformer(TransformerConfig.preset(a.config, **over)).cuda()
    ids = random_ids(model.config.vocab_size, 1, a.seq, torch.device("cuda"))
    for mode in a.modes.split(","):
        with apply_mode(model, mode), sdpa_context(a.sdpa):
            report(f"{mode}: seq {a.seq}", lambda: train_step(model, ids, torch.bfloat16), a.top)


def report(title: str, step, top: int = 12) -> None:
    """Run ``step`` once to warm up, then once under the profiler; print wall time, GPU busy time and
    the top kernels by GPU time."""
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6
    print(f"\n=== {title}, wall {wall * 1e3:.1f} ms (under the profiler), GPU busy "
          f"{busy * 1e3:.1f} ms ({busy / wall:.0%})")
    print(events.table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=60))


if __name__ == "__main__":
    main()
