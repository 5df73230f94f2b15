"""What ``revnet_zero.benchmarks.run`` does once its arguments are parsed (kept here so tests can drive it)."""
from __future__ import annotations

import dataclasses
import os
import time

import torch

from . import report
from .gradcheck import compare_grads
from .measure import cap_memory, environment, free_memory, gpu_slug, random_ids
from .modes import PURE_MODES, all_modes, check_mode, policy_modes
from .sdpa import BACKENDS, fastest_backend, sdpa_context, time_sdpa
from .suite import BenchmarkSuite

SDPA_MICRO = ("flash", "cudnn", "efficient")
AUTO_SDPA_LENGTH = 32768


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_model(config: str, layers: int | None, max_len: int, device: torch.device, ffn_chunk: int | None = None):
    """The preset ``config`` at ``layers`` deep, accepting ``max_len`` tokens, built on ``device``
    from seed 0 (the same weights in every call); ``ffn_chunk`` replaces the preset's FFN tile."""
    from revnet_zero.models import ReversibleGPT, TransformerConfig
    cfg = TransformerConfig.preset(config)
    cfg = dataclasses.replace(cfg, num_layers=layers or cfg.num_layers, max_seq_len=max(cfg.max_seq_len, max_len))
    if ffn_chunk:
        cfg = dataclasses.replace(cfg, ffn_chunk_size=ffn_chunk)
    torch.manual_seed(0)
    with torch.device(device):
        return ReversibleGPT(cfg)


class Run:
    """One call's results, written to ``<out>/<stem>.json`` / ``.md`` after every change."""

    def __init__(self, args, device: torch.device, deadline: float):
        self.args, self.device, self.deadline = args, device, deadline
        self.env = environment(device, args.commit)
        self.results = {"meta": {}, "rows": [], "sdpa": [], "grads": [], "maxctx": []}
        if args.resume_from:
            self.results = report.read_json(args.resume_from)
        topic = args.topic or "_".join(k for k, on in (("sdpa", args.sdpa_backends), ("grads", args.check_grads),
                                                       ("modes", args.modes), ("maxctx", args.max_context)) if on)
        self.stem = os.path.join(args.out, f"{topic or 'bench'}_{gpu_slug(self.env['gpu'])}_{self.env['date']}")
        self.title = f"RevNet-Zero benchmarks: {topic or 'bench'}, model {args.config}"
        os.makedirs(args.out, exist_ok=True)

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, section: str, entries: list[dict]) -> None:
        entries = [{**self.env, **e} for e in entries]
        self.results[section] = report.merge_rows(self.results[section], entries, section)
        self.save()

    def save(self, plots: bool = False) -> None:
        self.results["meta"].update(self.env, config=self.args.config)
        report.write_json(self.stem + ".json", self.results)
        with open(self.stem + ".md", "w") as f:
            f.write(report.to_markdown(self.results, self.title))
        if plots and self.results["rows"]:
            rows = self.results["rows"]
            try:
                report.plot_metric(rows, "peak_gib", self.stem + "_memory.png", "peak memory (GiB)")
                report.plot_metric(rows, "tokens_per_s", self.stem + "_throughput.png", "tokens/s")
            except ImportError as e:
                print(f"plots not written: {e}")


def choose_sdpa(run: Run) -> str | None:
    """Time the SDPA back ends if asked; resolve ``--sdpa`` ('auto': the fastest measured, now or in
    the resumed file) to a back end name, or None for PyTorch's own choice."""
    args = run.args
    lengths = _ints(args.sdpa_backends)
    if not lengths and args.sdpa == "auto" and run.device.type == "cuda" and not run.results["sdpa"]:
        lengths = [AUTO_SDPA_LENGTH]
    if lengths and run.device.type != "cuda":
        print("SDPA micro-benchmark skipped: it needs CUDA")
        lengths = []
    for seq_len in lengths:
        for backend in SDPA_MICRO:
            row = time_sdpa(backend, seq_len, device=run.device)
            print(f"sdpa {backend:9s} {seq_len:>8d}: " + (row.get("error") or
                  f"fwd {row['fwd_tflops']:.0f} / bwd {row['bwd_tflops']:.0f} TFLOP/s"), flush=True)
            run.add("sdpa", [row])
    if args.sdpa == "default" or run.device.type != "cuda":
        if args.sdpa not in ("auto", "default"):
            print(f"--sdpa {args.sdpa} ignored: forcing a back end needs CUDA")
        chosen = None
    elif args.sdpa == "auto":
        chosen = fastest_backend(run.results["sdpa"])
    elif args.sdpa in BACKENDS:
        chosen = args.sdpa
    else:
        raise SystemExit(f"--sdpa must be auto, default or one of {sorted(BACKENDS)}, got {args.sdpa!r}")
    run.results["meta"]["sdpa_backend"] = chosen or "default"
    return chosen


def check_grads(run: Run, sdpa: str | None, layers: int | None) -> None:
    args, seq_len = run.args, run.args.check_grads
    modes = _names(args.grad_modes) if args.grad_modes else [m for m in PURE_MODES if m != "standard"] + policy_modes()
    for m in modes:
        check_mode(m)
    amp = torch.bfloat16 if run.device.type == "cuda" else None
    model = build_model(args.config, layers, seq_len, run.device, args.ffn_chunk)
    ids = random_ids(model.config.vocab_size, args.batch, seq_len, run.device)
    with sdpa_context(sdpa):
        rows = compare_grads(model, ids, amp, modes)
    name = f"{args.config}-L{model.config.num_layers}{_tile(args)}"
    for r in rows:
        print(f"grads {r['mode']:14s} {seq_len}: {r['status']} max {r.get('max_rel_err')} "
              f"median {r.get('median_rel_err')} (floor {r['floor_max']:.2e})", flush=True)
    run.add("grads", [{"model": name, **r} for r in rows])
    del model, ids
    free_memory(run.device)


def sweep(run: Run, suite: BenchmarkSuite, layers_list: list) -> None:
    args = run.args
    modes = all_modes() if args.modes == "all" else _names(args.modes)
    lengths = _ints(args.lengths)
    models = {f"{args.config}-L{_depth(args.config, L)}{_tile(args)}":
              (lambda L=L: build_model(args.config, L, max(lengths), run.device, args.ffn_chunk)) for L in layers_list}

    def on_row(row):
        print(f"{row['model']} {row['mode']:14s} {row['seq_len']:>8d}: {row['status']:7s} "
              + (f"{row['step_s']:.3f} s  {row['peak_gib']}" if row["status"] == "ok" and row["step_s"] else
                 str(row.get("error") or "")), flush=True)
        run.add("rows", [row])

    suite.run(models, lengths, args.batch, modes=modes, on_row=on_row, max_seconds=max(run.seconds_left(), 1),
              previous=run.results["rows"])
    run.save(plots=True)


def max_context(run: Run, suite: BenchmarkSuite, layers: int | None) -> None:
    args = run.args
    modes = _names(args.max_context)
    model = build_model(args.config, layers, args.max_context_limit, run.device, args.ffn_chunk)
    name = f"{args.config}-L{model.config.num_layers}{_tile(args)}"
    for i, mode in enumerate(modes):
        share = run.seconds_left() / (len(modes) - i)
        res = suite.max_context(model, mode, args.max_context_start, args.max_context_limit,
                                args.max_context_granularity, share,
                                on_try=lambda t, m=mode: print(f"maxctx {m} {t['seq_len']}: {t['status']} "
                                                               f"{t['seconds']:.1f} s", flush=True))
        run.add("maxctx", [{"model": name, **res}])


def _tile(args) -> str:
    """Model-name suffix when the FFN tile is not the preset's."""
    return f"-ffn{args.ffn_chunk}" if getattr(args, "ffn_chunk", None) else ""


def _depth(config: str, layers: int | None) -> int:
    from revnet_zero.models import TransformerConfig
    return layers or TransformerConfig.preset(config).num_layers


def main(args, deadline: float) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cap_memory(device, getattr(args, "memory_cap_gib", None))
    run = Run(args, device, deadline)
    sdpa = choose_sdpa(run)
    layers_list = _ints(args.layers) if args.layers else [None]
    optimizer = "adamw_in_backward" if args.optimizer_in_backward else args.optimizer
    suite = BenchmarkSuite(device, repeats=args.repeats, optimizer=optimizer, sdpa_backend=sdpa,
                           long_tokens=args.long_tokens, long_warmup_tokens=args.long_warmup_tokens,
                           peer_max_len=args.peer_max_len, offload_max_host_gib=args.offload_max_host_gib,
                           commit=args.commit)
    if args.check_grads:
        check_grads(run, sdpa, args.grad_layers)
    if args.modes:
        sweep(run, suite, layers_list)
    if args.max_context:
        max_context(run, suite, args.max_context_layers)
    run.save(plots=bool(args.modes))
    print(f"\nwrote {run.stem}.md/.json ({time.monotonic() - (deadline - args.max_seconds):.0f} s)\n")
    print(report.to_markdown(run.results, run.title))
    return 0
