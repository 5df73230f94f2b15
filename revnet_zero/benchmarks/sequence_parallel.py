"""Sequence-parallel training steps over 1..N GPUs: tokens/s, peak memory per GPU, scaling efficiency.

Two entry points:

* ``python -m revnet_zero.benchmarks.sequence_parallel sweep --gpus 1,2,4 ...`` (one call on the GPU
  machine) starts ``torchrun`` once per GPU count, collects every rank's rows and writes
  ``sequence_parallel_<gpu>_<date>.{json,md}`` with weak-scaling efficiency (tokens/s per GPU at N GPUs
  over tokens/s at 1 GPU, same tokens per GPU);
* ``torchrun --nproc-per-node N -m revnet_zero.benchmarks.sequence_parallel run ...`` measures one GPU
  count (the sweep calls it), with ``--grad-check`` also comparing the N-rank gradients with one rank
  running the whole sequence.

Each length is one training step of model S or M (bf16 autocast, reversible ``recompute`` policy or
another, optional FSDP2 per block) on random tokens: a warm-up step, then the median of ``--repeats``
timed steps; peak is ``torch.cuda.max_memory_allocated`` (the largest over the ranks). A length that
runs out of memory ends that mode's sweep with an ``oom`` row.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .measure import GIB, environment, gpu_slug


def _parse_lengths(text: str) -> list[int]:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        scale = {"k": 1024, "m": 1024 * 1024}.get(item[-1:], 1)
        out.append(int(item[:-1] if scale > 1 else item) * scale)
    return out


def _build(args, device):
    from ..models import ReversibleTransformer, TransformerConfig
    overrides = {"max_seq_len": max(max(_parse_lengths(args.lengths)) * args.world, args.grad_check_len)}
    if args.layers:
        overrides["num_layers"] = args.layers
    if args.model == "tiny":
        overrides.update(vocab_size=256)
    model = ReversibleTransformer(TransformerConfig.preset(args.model, **overrides)).to(device)
    model.blocks.set_policy(args.policy)
    return model


def _wrap(model, args, device):
    if args.fsdp and args.world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (args.world,))
        for block in model.blocks.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    return model


def _step(model, ids, autocast) -> float:
    with autocast:
        loss = model(ids).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return loss.item()


def _measure(model, seq: int, args, device) -> dict:
    """One warm-up, then ``repeats`` timed steps at ``seq`` tokens (the whole sequence, all ranks)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    cuda = device.type == "cuda"
    _step(model, ids, autocast)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.repeats):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        _step(model, ids, autocast)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else float("nan")
    step = statistics.median(times)
    return {"step_s": step, "steps_timed": len(times), "tokens_per_s": seq / step, "peak_gib": peak}


def _max_over_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    t = t.cuda() if torch.cuda.is_available() else t
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _grad_check(args, device) -> dict:
    """N ranks with the sequence split vs this rank alone with the whole sequence (fp32, short)."""
    import copy

    from ..distributed import disable_sequence_parallel, enable_sequence_parallel
    torch.manual_seed(0)
    model = _build(args, device).float()
    ids = torch.randint(0, model.config.vocab_size, (1, args.grad_check_len), device=device)
    ref = copy.deepcopy(model)
    disable_sequence_parallel(ref)
    ref(ids).loss.backward()
    sp = enable_sequence_parallel(model, mode=args.mode)
    model(ids).loss.backward()
    from ..distributed import average_gradients
    average_gradients(model, sp)
    worst, name = 0.0, ""
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        err = ((p.grad.double() - q.grad.double()).norm() / q.grad.double().norm().clamp_min(1e-300)).item()
        if err > worst:
            worst, name = err, n
    return {"grad_check_len": args.grad_check_len, "grad_rel_err": worst, "worst_param": name}


def run(args) -> None:
    """Under torchrun (or alone with --world 1): every length of ``args``, rows to ``args.out``."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    args.world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cuda":
        from .measure import cap_memory
        cap_memory(device, args.memory_cap_gib)
    rows = []
    if args.grad_check and distributed:
        rows.append({"kind": "grad_check", "gpus": args.world, "mode": args.mode, **_grad_check(args, device)})
    from ..distributed import enable_sequence_parallel
    model = _build(args, device)
    if distributed:
        enable_sequence_parallel(model, mode=args.mode)
    model = _wrap(model, args, device)
    for per_gpu in _parse_lengths(args.lengths):
        seq = per_gpu * args.world
        row = {"kind": "step", "model": args.model, "layers": model.config.num_layers, "gpus": args.world,
               "mode": args.mode if distributed else "single", "fsdp": bool(args.fsdp and distributed),
               "policy": args.policy, "tokens_per_gpu": per_gpu, "seq": seq}
        try:
            row.update(_measure(model, seq, args, device), status="ok")
        except torch.OutOfMemoryError:
            row.update(status="oom")
        row["peak_gib"] = _max_over_ranks(row.get("peak_gib", float("nan")))
        rows.append(row)
        if row["status"] != "ok":
            break
    if rank == 0:
        env = environment(device, args.commit)
        with open(args.out, "w") as f:
            json.dump([{**r, **env} for r in rows], f, indent=1)
    if distributed:
        dist.destroy_process_group()


def _check_sweep(args) -> None:
    """ValueError, before any GPU time is spent, for a sweep whose runs would all fail the same way."""
    from ..distributed.sequence_parallel import MODES
    from ..engine import POLICIES
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        raise ValueError(f"--modes takes a comma-separated subset of {MODES}, got {args.modes!r}")
    if args.policy not in POLICIES:
        raise ValueError(f"--policy must be one of {POLICIES}, got {args.policy!r}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    lengths = _parse_lengths(args.lengths)
    if any(n < 1 for n in lengths):
        raise ValueError(f"--lengths must be positive token counts per GPU, got {args.lengths!r}")
    # the ring cuts a causal sequence of per_gpu * N tokens into 2N chunks: per_gpu must be even
    if "ring" in modes and any(n % 2 for n in lengths):
        raise ValueError(f"mode 'ring' needs even tokens per GPU (two chunks per rank), got --lengths {args.lengths!r}")
    gpus = [int(x) for x in args.gpus.split(",")]
    if any(n < 1 for n in gpus):
        raise ValueError(f"--gpus takes positive GPU counts, got {args.gpus!r}")
    for n in gpus:
        parts = 2 * n if "ring" in modes else n
        if args.grad_check and n > 1 and args.grad_check_len % parts:
            raise ValueError(f"--grad-check-len {args.grad_check_len} must be divisible by {parts} "
                             f"({n} GPUs{', ring: two chunks per rank' if 'ring' in modes else ''})")


def _launch(cmd: list[str], timeout_s: int) -> int | None:
    """Run ``cmd`` (torchrun) in its own session; its exit code, or None when it ran past ``timeout_s``:
    then torchrun and its workers are killed together (a hung collective must not hold the GPUs, nor
    end the sweep and lose the rows already measured)."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def sweep(args) -> None:
    """torchrun for each GPU count; weak-scaling efficiency against the 1-GPU row at equal tokens/GPU."""
    _check_sweep(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.gpus.split(",")]:
            for mode in (args.modes.split(",") if n > 1 else ["single"]):
                out = Path(tmp) / f"{n}_{mode}.json"
                cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
                       "-m", "revnet_zero.benchmarks.sequence_parallel", "run", "--out", str(out),
                       "--model", args.model, "--lengths", args.lengths, "--repeats", str(args.repeats),
                       "--policy", args.policy, "--mode", mode if n > 1 else "all_to_all"]
                cmd += ["--layers", str(args.layers)] if args.layers else []
                cmd += ["--fsdp"] if args.fsdp else []
                if args.grad_check and n > 1:
                    cmd += ["--grad-check", "--grad-check-len", str(args.grad_check_len)]
                cmd += ["--memory-cap-gib", str(args.memory_cap_gib)] if args.memory_cap_gib else []
                cmd += ["--commit", args.commit] if args.commit else []
                code = _launch(cmd, args.timeout_s)
                if out.exists():
                    rows += json.loads(out.read_text())
                else:
                    rows.append({"kind": "error", "gpus": n, "mode": mode, "exit_code": code,
                                 "timed_out_s": args.timeout_s if code is None else None})
    _efficiency(rows)
    _write(rows, args)


def _efficiency(rows: list[dict]) -> None:
    single = {r["tokens_per_gpu"]: r["tokens_per_s"] for r in rows
              if r.get("kind") == "step" and r["gpus"] == 1 and r["status"] == "ok"}
    for r in rows:
        if r.get("kind") == "step" and r["status"] == "ok" and r["tokens_per_gpu"] in single:
            r["weak_scaling_efficiency"] = r["tokens_per_s"] / r["gpus"] / single[r["tokens_per_gpu"]]


def _write(rows: list[dict], args) -> None:
    env = next((r for r in rows if "gpu" in r), {})
    stem = f"sequence_parallel_{gpu_slug(env.get('gpu', 'unknown'))}_{env.get('date', 'undated')}"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    lines = [f"# Sequence parallelism, model {args.model} ({env.get('gpu')}, torch {env.get('torch')}, "
             f"commit {env.get('commit')}, {env.get('date')})", "",
             f"One training step, median of {args.repeats} after a warm-up; peak = largest over the ranks.", "",
             "| GPUs | mode | FSDP2 | tokens/GPU | sequence | step s | tokens/s | peak GiB/GPU | weak-scaling eff. "
             "| status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") == "step":
            eff = r.get("weak_scaling_efficiency")
            lines.append(f"| {r['gpus']} | {r['mode']} | {r['fsdp']} | {r['tokens_per_gpu']:,} | {r['seq']:,} | "
                         f"{r.get('step_s', float('nan')):.3f} | {r.get('tokens_per_s', float('nan')):,.0f} | "
                         f"{r['peak_gib']:.2f} | {'' if eff is None else f'{eff:.3f}'} | {r['status']} |")
    for r in rows:
        if r.get("kind") == "grad_check":
            lines.append(f"\nGradient check, {r['gpus']} GPUs, {r['mode']}, {r['grad_check_len']} tokens (fp32): "
                         f"worst relative error {r['grad_rel_err']:.3g} ({r['worst_param']})")
        if r.get("kind") == "error":
            why = (f"ran past --timeout-s {r['timed_out_s']} and was killed" if r.get("timed_out_s")
                   else f"exited {r['exit_code']}")
            lines.append(f"\n{r['gpus']} GPUs, {r['mode']}: torchrun {why} with no rows")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m revnet_zero.benchmarks.sequence_parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", "sweep"):
        s = sub.add_parser(name)
        s.add_argument("--model", default="S", help="preset: S, M, tiny (CPU smoke test)")
        s.add_argument("--layers", type=int, default=None, help="override the preset's depth")
        s.add_argument("--lengths", default="128k,256k", help="tokens per GPU, comma-separated (k, m suffixes)")
        s.add_argument("--repeats", type=int, default=3, help="timed steps per length (median)")
        s.add_argument("--policy", default="recompute", help="memory policy of every block")
        s.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard per block and on the root")
        s.add_argument("--grad-check", action="store_true", help="also compare N-rank vs 1-rank gradients")
        s.add_argument("--grad-check-len", type=int, default=4096)
        s.add_argument("--memory-cap-gib", type=float, default=None)
        s.add_argument("--commit", default=None)
    run_p, sweep_p = sub.choices["run"], sub.choices["sweep"]
    run_p.add_argument("--mode", default="all_to_all", choices=["all_to_all", "all_gather", "ring"])
    run_p.add_argument("--out", required=True)
    sweep_p.add_argument("--gpus", default="1,2,4")
    sweep_p.add_argument("--modes", default="all_to_all,all_gather,ring")
    sweep_p.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    sweep_p.add_argument("--timeout-s", type=int, default=3600)
    args = p.parse_args(argv)
    (run if args.command == "run" else sweep)(args)


if __name__ == "__main__":
    main()
