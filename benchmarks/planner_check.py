"""Does the memory planner keep its word? Predicted vs measured peak and speed under budgets (GPU).

For each length: measure ``standard`` (where it fits) and ``full_ac``; profile the model with
``MemoryProfiler``; plan under each budget (full_ac's measured peak; 'roomy' = the device's free
memory; 'tight' = halfway between the least-memory plan's predicted peak and full_ac's peak); apply
the plan and measure one step. Rows: predicted and measured peak (GiB), whether the measured peak
stayed within the budget, step time vs full_ac and standard, the policy mix.

    python -m benchmarks.planner_check --lengths 8192,32768,131072 --commit abc1234 --out $OUT
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time

import torch

from revnet_zero.benchmarks.measure import environment, free_memory, gpu_slug, measure_step, random_ids
from revnet_zero.benchmarks.modes import apply_mode
from revnet_zero.benchmarks.runner import build_model
from revnet_zero.benchmarks.sdpa import sdpa_context
from revnet_zero.memory import MemoryProfiler
from revnet_zero.memory.scheduler import device_budget, plan, verified_plan

GIB = 2**30
AMP = torch.bfloat16


def loss_fn(model, ids):
    with torch.autocast(ids.device.type, dtype=AMP):
        return model(ids).loss


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="S")
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--budgets", default="full_ac,tight,roomy")
    p.add_argument("--standard-max", type=int, default=32768, help="measure 'standard' up to this length")
    p.add_argument("--sdpa", default="cudnn")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--topic", default="planner", help="file name prefix")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the code path (no peaks)")
    p.add_argument("--replot", default="", help="comma list of result .json files: write one plot of "
                   "their rows to --out/<topic>.png and exit (no GPU)")
    a = p.parse_args(argv)
    if a.replot:
        rows = [r for f in a.replot.split(",") for r in json.load(open(f))]
        print(plot(rows, os.path.join(a.out, f"{a.topic}.png")))
        return
    # as revnet_zero.benchmarks.run: without expandable segments, full AC at 256k fails on fragmentation
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    dev = torch.device(a.device)
    env = environment(dev, a.commit)
    stem = os.path.join(a.out, f"{a.topic}_{gpu_slug(env['gpu'])}_{env['date']}")
    os.makedirs(a.out, exist_ok=True)
    rows = []
    with sdpa_context(a.sdpa if dev.type == "cuda" else None):
        for seq in (int(x) for x in a.lengths.split(",")):
            model = build_model(a.config, None, seq, dev)
            ids = random_ids(model.config.vocab_size, 1, seq, dev)
            long = seq >= 131072
            warm = random_ids(model.config.vocab_size, 1, 16384, dev, seed=1) if long else ids
            repeats = 1 if long else 3
            ref = {}
            for mode in ("standard", "full_ac"):
                if mode == "standard" and seq > a.standard_max:
                    continue
                with apply_mode(model, mode):
                    ref[mode] = measure_step(model, ids, AMP, repeats, warm)
                print(f"{seq} {mode}: {ref[mode].status} {ref[mode].step_s} s {ref[mode].peak_gib} GiB "
                      f"{ref[mode].error or ''}", flush=True)
            t0 = time.perf_counter()
            profiler = MemoryProfiler(model, loss_fn=loss_fn)
            prof = profiler.profile(ids)
            prof_s = time.perf_counter() - t0
            free_memory(dev)
            least = plan(prof, 2**62, ("recompute",)).predicted_peak
            ac = ref["full_ac"]
            ac_peak = int(ac.peak_gib * GIB) if ac.status == "ok" and ac.peak_gib else None
            budgets = {}
            for b in a.budgets.split(","):
                if b == "full_ac" and ac_peak:
                    budgets[b] = ac_peak
                elif b == "tight" and ac_peak:
                    budgets[b] = (least + ac_peak) // 2
                elif b == "roomy":
                    budgets[b] = device_budget(dev)
            for name, budget in budgets.items():
                try:
                    first = plan(prof, budget)
                    pl = verified_plan(prof, budget, lambda pols: profiler.measure_peak(ids, pols))
                except ValueError as e:
                    rows.append({**env, "seq": seq, "budget": name, "status": "no plan", "error": str(e)})
                    continue
                model.blocks.set_policy("recompute")
                for blk, pol in zip(model.blocks.blocks, pl.policies):
                    blk.policy = pol
                r = measure_step(model, ids, AMP, repeats, warm)
                model.blocks.set_policy("recompute")
                row = {**env, "seq": seq, "budget": name, "budget_gib": budget / GIB, "status": r.status,
                       "policies": dict(collections.Counter(pl.policies)),
                       "first_predicted_peak_gib": first.predicted_peak / GIB,
                       "first_error_gib": pl.first_error / GIB,
                       "predicted_peak_gib": pl.predicted_peak / GIB, "verify_peak_gib": pl.measured_peak / GIB,
                       "measured_peak_gib": r.peak_gib,
                       "within_budget": r.peak_gib is not None and r.peak_gib * GIB <= budget,
                       "predicted_s": pl.predicted_seconds, "step_s": r.step_s, "profile_s": prof_s,
                       "full_ac_s": ref["full_ac"].step_s, "full_ac_peak_gib": ref["full_ac"].peak_gib,
                       "standard_s": ref["standard"].step_s if "standard" in ref else None,
                       "standard_peak_gib": ref["standard"].peak_gib if "standard" in ref else None,
                       "error": r.error}
                if r.peak_gib:
                    row["peak_error"] = pl.predicted_peak / GIB / r.peak_gib - 1
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in env}), flush=True)
                print(pl.explain().splitlines()[-1], flush=True)
                write(stem, rows, env)
                plot(rows, stem + ".png")
            del model
            free_memory(dev)
    write(stem, rows, env)


def write(stem: str, rows: list[dict], env: dict) -> None:
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["# Planner: predicted vs measured (bf16, batch 1)", "",
             f"GPU {env['gpu']}, torch {env['torch']}, commit {env['commit']}, {env['date']}. Budgets: full_ac = "
             "full_ac's measured peak; tight = halfway between the least-memory plan and full_ac's peak; roomy = "
             "the free device memory. Step times are CUDA-synchronised wall clock (median of 3 below 128k, one "
             "step from 128k).", "",
             "Each plan is verified: planned from the profile, measured in one step, replanned with the "
             "overshoot taken off the room while the measured peak exceeds the budget. 'first error' is the "
             "unverified first plan's measured minus predicted peak; 'error' compares the final plan's "
             "prediction with the peak of the timed step.", "",
             "| seq | budget | budget GiB | policies | first error GiB | predicted peak | measured peak | error | "
             "within | step s | vs full_ac | vs standard |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['seq']} | {r['budget']} | | {r.get('error', '')} | | | | | | | | |")
            continue
        vs_ac = r["full_ac_s"] / r["step_s"] if r["full_ac_s"] else None
        vs_std = r["standard_s"] / r["step_s"] if r["standard_s"] else None
        mix = ", ".join(f"{k} {v}" for k, v in r["policies"].items())
        lines.append(f"| {r['seq']} | {r['budget']} | {r['budget_gib']:.2f} | {mix} | {_f(r['first_error_gib'], '+.2f')} | "
                     f"{_f(r['predicted_peak_gib'])} | "
                     f"{_f(r['measured_peak_gib'])} | {_f(r.get('peak_error'), '+.1%')} | {r['within_budget']} | "
                     f"{_f(r['step_s'], '.3f')} | {_f(vs_ac, '.3f', 'x')} | {_f(vs_std, '.3f', 'x')} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(rows: list[dict], path: str) -> str:
    """Per row (length / budget): budget, predicted and measured peak; step speed against full AC."""
    from revnet_zero.benchmarks.report import _matplotlib
    Figure, FigureCanvasAgg = _matplotlib()
    rows = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: (r["seq"], r["budget_gib"]))
    labels = [f"{r['seq'] // 1024}k\n{r['budget']}\n{r.get('commit') or ''}" for r in rows]
    x = range(len(rows))
    fig = Figure(figsize=(max(8, 0.9 * len(rows) + 2), 7))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2, 1, 1)
    w = 0.27
    ax.bar([i - w for i in x], [r["budget_gib"] for r in rows], w, label="budget", color="0.75")
    ax.bar(list(x), [r["predicted_peak_gib"] for r in rows], w, label="predicted peak")
    ax.bar([i + w for i in x], [r["measured_peak_gib"] for r in rows], w, label="measured peak")
    ax.set_yscale("log")
    ax.set_ylabel("GiB")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title(f"planner on {rows[0]['gpu'] if rows else '?'}: peaks (budget 'roomy' = free memory)")
    ax = fig.add_subplot(2, 1, 2)
    ax.bar(list(x), [r["full_ac_s"] / r["step_s"] for r in rows], 0.5, label="plan's tokens/s / full AC's")
    ax.axhline(1.0, color="0.4", lw=0.8)
    ax.axhline(1.15, color="tab:red", lw=0.8, ls="--", label="1.15x")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("x full AC")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _f(v, spec: str = ".2f", unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


if __name__ == "__main__":
    main()
