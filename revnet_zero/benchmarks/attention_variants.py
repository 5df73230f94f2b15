"""One GPU call: the fair headline (single-stream baselines beside the reversible policies) and model S
with each attention variant at 256k-4M tokens. Writes md + json after every row.

    python -m revnet_zero.benchmarks.attention_variants --out "$OUT" [--memory-cap-gib 78.4]
    python -m revnet_zero.benchmarks.attention_variants --out /tmp/x --smoke      # tiny, CPU, seconds

Rows run in order of importance (the issue's targets first) inside ``--budget-s``: each row's step time
is predicted from the last measured row of the same kind (linear in S for the variants, quadratic for
exact attention); a row takes 3 timed steps when that fits the time left, 1 when only that fits, and is
skipped with its prediction written down otherwise. Every row records its first step (compile, block
mask, allocator warm-up) apart from the timed ones, and how many were timed.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..models import ReversibleTransformer, TransformerConfig
from .measure import (GIB, cap_memory, environment, free_memory, gpu_slug, is_oom, random_ids, sync,
                      train_step)
from .modes import apply_mode

K = 1024
HEADLINE_MODES = ("single_standard", "single_full_ac", "revnet_zero", "revnet_zero:store_attention",
                  "revnet_zero:offload_attention")
VARIANTS = ("sliding_window", "hierarchical", "rational_fourier")
TINY = dict(vocab_size=256, num_layers=2, d_model=32, num_heads=4, d_ff=64, loss_chunk_size=256,
            attention_window=8, local_window=8, compression_ratios=(2, 4, 8), rf_num_features=8)


@dataclass
class Row:
    part: str                        # 'headline' or 'variants'
    attention: str                   # TransformerConfig.attention
    mode: str                        # benchmark mode (modes.py)
    seq_len: int
    status: str = "pending"          # ok | oom | error | skipped
    first_step_s: float | None = None   # the untimed first step: compile, block mask, warm-up
    step_s: float | None = None      # median of the timed steps
    times: list = field(default_factory=list)
    peak_gib: float | None = None    # max_memory_allocated over all steps of the row
    tokens_per_s: float | None = None
    predicted_s: float | None = None
    note: str = ""


def plan(smoke: bool) -> list[Row]:
    """Rows in order of importance."""
    L = [16, 24, 32, 48, 64, 96, 128] if smoke else [8 * K, 32 * K, 128 * K, 256 * K, 1024 * K, 2048 * K, 4096 * K]
    s8, s32, s128, s256, m1, m2, m4 = L[0], L[1], L[2], L[3], L[-3], L[-2], L[-1]
    rows = [Row("variants", a, "revnet_zero", m1) for a in VARIANTS]
    rows += [Row("headline", "softmax", m, s) for s in (s8, s32) for m in HEADLINE_MODES]
    rows += [Row("variants", a, "revnet_zero", s32) for a in VARIANTS]
    rows += [Row("variants", a, "revnet_zero", s256) for a in (*VARIANTS, "softmax")]
    rows += [Row("variants", a, "revnet_zero", m2) for a in VARIANTS]
    rows += [Row("headline", "softmax", m, s) for s in (s128, s256) for m in HEADLINE_MODES]
    rows += [Row("variants", a, "revnet_zero", m4) for a in VARIANTS]
    rows += [Row("variants", "softmax", "revnet_zero", m1)]
    return rows


def predict(row: Row, done: list[Row]) -> float | None:
    """Step time from the longest measured row of the same kind, scaled by length (S^2 for exact)."""
    same = [r for r in done if r.status == "ok" and (r.attention, r.mode) == (row.attention, row.mode)]
    if not same:
        return None
    ref = max(same, key=lambda r: r.seq_len)
    power = 2 if row.attention == "softmax" and row.seq_len > 32 * K else 1
    return ref.step_s * (row.seq_len / ref.seq_len) ** power


def build(attention: str, smoke: bool, device: torch.device) -> ReversibleTransformer:
    if smoke:
        cfg = TransformerConfig(**TINY, attention=attention, max_seq_len=4096, hierarchy_levels=3)
    else:
        cfg = TransformerConfig.preset("S" if attention == "softmax" else f"S-{attention}", max_seq_len=4096 * K)
    torch.manual_seed(0)
    return ReversibleTransformer(cfg).to(device)


def run_row(row: Row, model, device, amp, repeats: int) -> None:
    ids = random_ids(model.config.vocab_size, 1, row.seq_len, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with apply_mode(model, row.mode):
            t0 = time.perf_counter()
            train_step(model, ids, amp)
            sync(device)
            row.first_step_s = time.perf_counter() - t0
            for _ in range(repeats):
                t0 = time.perf_counter()
                train_step(model, ids, amp)
                sync(device)
                row.times.append(time.perf_counter() - t0)
        row.status = "ok"
        row.step_s = statistics.median(row.times) if row.times else row.first_step_s
        row.tokens_per_s = row.seq_len / row.step_s
        if not row.times:
            row.note = "1 step, including the first-step warm-up"
    except Exception as e:  # noqa: BLE001 - recorded in the row
        model.zero_grad(set_to_none=True)
        row.status = "oom" if is_oom(e) else "error"
        row.note = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    finally:
        if device.type == "cuda":
            row.peak_gib = torch.cuda.max_memory_allocated(device) / GIB
        free_memory(device)


def choose_repeats(row: Row, done: list[Row], left: float, most: int = 3) -> int | None:
    """``most`` timed steps if they fit in ``left`` seconds (with the first step at 1.5x), 1 or 0 if only
    that fits, None to skip."""
    p = row.predicted_s = predict(row, done)
    if p is None:   # nothing to predict from: long rows take one timed step, as their first may be minutes
        return min(most, 1) if row.seq_len >= 256 * K or left < 60 else most
    for n in sorted({most, min(most, 1), 0}, reverse=True):
        if p * (1.5 + n) <= left:
            return n
    return None


def write(rows: list[Row], env: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"env": env, "rows": [asdict(r) for r in rows]}, indent=1))
    lines = [f"# Attention variants and the single-stream headline ({env['gpu']}, torch {env['torch']}, "
             f"commit {env['commit']}, {env['date']}, memory cap {env['memory_cap_gib']} GiB)", "",
             "| part | attention | mode | tokens | status | step s (median) | timed steps | first step s | "
             "peak GiB | tokens/s | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.part} | {r.attention} | {r.mode} | {r.seq_len:,} | {r.status} | {_f(r.step_s)} | "
                     f"{len(r.times)} | {_f(r.first_step_s)} | {_f(r.peak_gib)} | {_f(r.tokens_per_s, 0)} | {r.note} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def _f(x, digits=2):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(prog="python -m revnet_zero.benchmarks.attention_variants", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the md and json results")
    p.add_argument("--memory-cap-gib", type=float, default=None, help="cap the allocator (78.4 stands in for 80 GB)")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting rows that would end after this")
    p.add_argument("--parts", default="headline,variants", help="comma list: headline, variants")
    p.add_argument("--max-repeats", type=int, default=3, help="timed steps a row takes at most (median)")
    p.add_argument("--smoke", action="store_true", help="tiny model and lengths (CPU is fine): checks the script")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts <= {"headline", "variants"}:
        raise SystemExit(f"error: --parts takes headline and/or variants, got {args.parts!r}")
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cap_memory(device, args.memory_cap_gib)
    amp = torch.bfloat16 if device.type == "cuda" else None
    env = environment(device)
    stem = f"attention_variants_{'smoke' if args.smoke else gpu_slug(env['gpu'])}_{env['date']}"
    rows = [r for r in plan(args.smoke) if r.part in parts]
    models: dict = {}
    for row in rows:
        left = args.budget_s - (time.perf_counter() - start)
        repeats = choose_repeats(row, rows, left, args.max_repeats)
        if repeats is None:
            row.status, row.note = "skipped", f"predicted {row.predicted_s:.0f} s a step, {left:.0f} s left"
        else:
            if row.attention not in models:
                models.clear()
                free_memory(device)
                models[row.attention] = build(row.attention, args.smoke, device)
            run_row(row, models[row.attention], device, amp, repeats)
        print(f"{row.part} {row.attention} {row.mode} {row.seq_len}: {row.status} {_f(row.step_s)} s "
              f"{_f(row.peak_gib)} GiB {row.note}", flush=True)
        write(rows, env, Path(args.out), stem)
    return rows


if __name__ == "__main__":
    main()
