"""The JAX port against PyTorch and against JAX remat at long context, in one call.

    python -m revnet_zero.benchmarks.jax_port --out benchmarks/results/jax_port-h200.json

Model S (``TransformerConfig.preset('S')``), batch 1, at 32k, 128k and 256k tokens, three runs:

* ``jax_reversible``: ``ReversibleTransformerJAX``, the reversible custom_vjp (``JAXMemoryScheduler()``);
* ``jax_remat``: the same model under ``jax.checkpoint`` per block (policy ``'checkpoint'``), what Flax
  users get today;
* ``torch``: our PyTorch ``ReversibleTransformer`` (bf16 autocast).

A step is forward, loss and backward (gradients of every weight; no optimizer), weights float32, matmuls
and attention in bf16 (JAX attention: cuDNN on GPU). Each (run, length) runs in its own process, so a
crash or an out-of-memory error stays in its row and each peak is that process's alone: PyTorch's
``max_memory_allocated``, JAX's ``peak_bytes_in_use`` (preallocation off), both after one warm-up step.
The JAX rows also carry the compiled step's temporary bytes. ``--smoke`` runs the tiny preset on CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

RUNS = ("jax_reversible", "jax_remat", "torch")
POLICY = {"jax_reversible": "recompute", "jax_remat": "checkpoint"}
GIB = 2 ** 30


def _ids(vocab: int, seq_len: int):
    import torch

    from .measure import random_ids  # the same tokens in every run
    return random_ids(vocab, 1, seq_len, torch.device("cpu"))


def _torch_model(cfg):
    """The PyTorch model every run starts from (the JAX runs take its weights), so the losses of the
    three runs of a length must agree: a check that they compute the same thing."""
    import torch

    from ..models import ReversibleTransformer
    torch.manual_seed(0)
    return ReversibleTransformer(cfg)


def run_jax(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from ..jax import (
        JAXMemoryScheduler,
        ReversibleTransformerJAX,
        from_torch_state_dict,
    )
    from ..models.config import TransformerConfig
    gpu = jax.devices()[0].platform == "gpu"
    cfg = TransformerConfig.preset(spec["preset"], max_seq_len=spec["seq_len"])
    model = ReversibleTransformerJAX.from_config(cfg, compute_dtype="bfloat16", use_scan=True,
                                                 attention_implementation="cudnn" if gpu else None)
    ids = jnp.asarray(_ids(cfg.vocab_size, spec["seq_len"]).numpy(), jnp.int32)
    params = from_torch_state_dict(model, _torch_model(cfg).state_dict())
    step = JAXMemoryScheduler(rematerialization_policy=POLICY[spec["run"]]).schedule(model)
    compiled = step.lower(params, ids).compile()             # compiled once, timed as it is
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(params, ids, None, None))  # warm-up
    times, loss = [], None
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        loss, grads = jax.block_until_ready(compiled(params, ids, None, None))
        times.append(time.perf_counter() - t0)
        del grads
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"status": "ok", "step_s": statistics.median(times), "step_times": times, "loss": float(loss),
            "peak_gib": peak / GIB if peak is not None else None, "compiled_temp_gib": temp / GIB,
            "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def run_torch(spec: dict) -> dict:
    import torch

    from ..models import TransformerConfig
    from .measure import measure_step
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TransformerConfig.preset(spec["preset"], max_seq_len=spec["seq_len"])
    model = _torch_model(cfg).to(device)
    ids = _ids(cfg.vocab_size, spec["seq_len"]).to(device)
    r = measure_step(model, ids, torch.bfloat16 if device.type == "cuda" else None, spec["repeats"], ids)
    return {"status": r.status, "step_s": r.step_s, "step_times": r.times, "loss": r.loss, "peak_gib": r.peak_gib,
            "error": r.error, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__}


def run_in_subprocess(spec: dict, timeout: float) -> dict:
    """One row from a fresh process (so each peak is the run's own and a crash stays in its row)."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if spec.get("cpu"):
        env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "revnet_zero.benchmarks.jax_port", "--one", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**spec, "status": "timeout", "error": f"no result within {timeout:.0f} s"}
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        oom = "out of memory" in p.stderr.lower() or "resource_exhausted" in p.stderr.lower()
        return {**spec, "status": "oom" if oom else "error", "error": " | ".join(tail)[-800:]}
    return {**spec, **json.loads(lines[-1][len("RESULT "):])}


def ratios(rows: list[dict]) -> list[dict]:
    """Per length: JAX reversible over PyTorch (time, peak) and over JAX remat (peak)."""
    by = {(r["run"], r["seq_len"]): r for r in rows if r.get("status") == "ok"}
    out = []
    for s in sorted({r["seq_len"] for r in rows}):
        rev, pt, remat = by.get(("jax_reversible", s)), by.get(("torch", s)), by.get(("jax_remat", s))

        def q(a, b, key):
            return a[key] / b[key] if a and b and a.get(key) and b.get(key) else None
        out.append({"seq_len": s, "time_vs_torch": q(rev, pt, "step_s"), "peak_vs_torch": q(rev, pt, "peak_gib"),
                    "peak_vs_remat": q(rev, remat, "peak_gib")})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="results JSON (written atomically)")
    ap.add_argument("--seq-lens", default=None, help="comma-separated lengths (default 32768,131072,262144; "
                    "smoke: 32,64)")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {RUNS}")
    ap.add_argument("--preset", default="S")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per row (the median is reported)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per row")
    ap.add_argument("--smoke", action="store_true", help="tiny preset on CPU, lengths 32 and 64, one repeat")
    ap.add_argument("--one", help=argparse.SUPPRESS)   # internal: run one row in this process
    a = ap.parse_args(argv)
    if a.one:
        spec = json.loads(a.one)
        row = run_torch(spec) if spec["run"] == "torch" else run_jax(spec)
        print("RESULT " + json.dumps(row), flush=True)
        return row
    runs = a.runs.split(",")
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise SystemExit(f"unknown runs {bad}; expected some of {RUNS}")
    preset, repeats = ("tiny", 1) if a.smoke else (a.preset, a.repeats)
    lens = [int(s) for s in (a.seq_lens or ("32,64" if a.smoke else "32768,131072,262144")).split(",")]
    rows = []
    for s in lens:
        for run in runs:
            spec = {"run": run, "seq_len": s, "preset": preset, "repeats": repeats, "cpu": a.smoke}
            rows.append(run_in_subprocess(spec, a.timeout))
            r = rows[-1]
            print(f"{run:15s} {s:7d}  {r['status']:7s} step {r.get('step_s') or float('nan'):8.3f} s  "
                  f"peak {r.get('peak_gib') or float('nan'):7.2f} GiB  {r.get('error') or ''}", flush=True)
    from .measure import git_commit
    results = {"meta": {"commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                        "preset": preset, "batch": 1, "repeats": repeats, "python": sys.version.split()[0]},
               "rows": rows, "ratios": ratios(rows)}
    for r in results["ratios"]:
        print(json.dumps(r))
    if a.out:
        tmp = f"{a.out}.tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, a.out)
    return results


if __name__ == "__main__":
    main()
