"""``BenchmarkSuite``: one training step per (model, mode, length), side by side in one process."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..engine import ReversibleSequence
from .measure import EnergyMeter, StepResult, environment, free_memory, measure_step, random_ids
from .modes import PEER_MODES, apply_mode, check_mode, stack_of
from .sdpa import probe_backend, sdpa_context

METRICS = ("memory", "throughput", "energy")
PEER_NOTES = {"memcnn": "memcnn casts block inputs to fp32 and runs f/g with autocast off",
              "revlib": "revlib recomputes in backward outside autocast (fp32)"}
DONE = ("ok", "oom")  # statuses a resumed run does not repeat (errors are retried: they may be fixed)


class BenchmarkSuite:
    """Times one training step (forward, loss, backward; AdamW step if ``optimizer``) of each model in
    each mode at each length, and records peak memory, tokens/s and energy per token.

    ``device``: default CUDA if available, else CPU (wall clock only, memory None).
    ``amp_dtype``: autocast dtype; ``'auto'`` is bf16 on CUDA and none (fp32) on CPU.
    ``repeats``: timed steps (median) after one warm-up; at ``long_tokens`` tokens or more, one timed
    step after a warm-up at ``long_warmup_tokens`` (the kernels and allocator warm, not 2x the time).
    ``sdpa_backend``: force 'flash' / 'cudnn' / 'efficient' / 'math' (None: PyTorch's choice); every
    row names the back end that actually ran. ``peer_max_len``: memcnn and revlib are slow; longer
    lengths are skipped for them. ``offload_max_host_gib``: ``ac_offload`` rows that would pin more host
    memory than this are skipped (the pinned copies can take the host down before CUDA says no).

    Example::

        suite = BenchmarkSuite()
        rows = suite.run(models={"S": model}, sequence_lengths=[8192, 32768], batch_sizes=1,
                         metrics=["memory", "throughput", "energy"], modes=["standard", "revnet_zero"])
        suite.plot_results(rows, "benchmark_results.png")
    """

    def __init__(self, device: str | torch.device | None = None, amp_dtype="auto", repeats: int = 2,
                 optimizer: bool | str = False, sdpa_backend: str | None = None, long_tokens: int = 262144,
                 long_warmup_tokens: int = 16384, peer_max_len: int = 32768, offload_max_host_gib: float | None = 64,
                 commit: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if amp_dtype == "auto":
            amp_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if optimizer not in (False, True, "adamw", "adamw_in_backward"):
            raise ValueError(f"optimizer must be False, True/'adamw' or 'adamw_in_backward', got {optimizer!r}")
        self.amp_dtype, self.repeats, self.optimizer = amp_dtype, repeats, optimizer
        self.sdpa_backend, self.peer_max_len = sdpa_backend, peer_max_len
        self.offload_max_host_gib = offload_max_host_gib
        self.long_tokens, self.long_warmup_tokens = long_tokens, long_warmup_tokens
        self.env = environment(self.device, commit)
        self._probes: dict = {}

    # ------------------------------------------------------------ public API

    def run(self, models: dict, sequence_lengths: Iterable[int], batch_sizes: int | Iterable[int] = 1,
            metrics: Iterable[str] = METRICS, modes: Iterable[str] | None = None,
            on_row: Callable[[dict], None] | None = None, max_seconds: float | None = None,
            previous: list[dict] | None = None) -> list[dict]:
        """One row per (model, mode, length). ``models``: name -> module, or a zero-argument callable
        building it (built when its turn comes, freed after). ``batch_sizes`` pairs with
        ``sequence_lengths`` (or one int for all). ``modes``: None runs each model as it is; see
        ``modes.MODES``. A mode stops at its first out-of-memory or error. ``on_row`` is called after
        every row (write results there). ``max_seconds``: skip rows predicted to overrun it.
        ``previous``: rows of an interrupted run; their (model, mode, length, batch) are not repeated.
        """
        lengths, batches = _pair(sequence_lengths, batch_sizes)
        metrics = _check_metrics(metrics)
        modes = list(modes) if modes is not None else [None]
        for m in modes:
            if m is not None:
                check_mode(m)
        deadline = time.monotonic() + max_seconds if max_seconds else None
        meter = EnergyMeter(self.device) if "energy" in metrics else None
        rows = []
        for name, spec in models.items():
            rows += self._run_model(name, spec, lengths, batches, modes, metrics, meter, on_row, deadline,
                                    previous or [])
        return rows

    def plot_results(self, results: list[dict], path: str = "benchmark_results.png") -> list[str]:
        """Peak memory and tokens/s against sequence length, one line per model/mode. ``path`` may be a
        bare format (``'png'``): then ``benchmark_results.<format>``."""
        from .report import plot_results
        return plot_results(results, path)

    # ------------------------------------------------------------ internals

    def _run_model(self, name, spec, lengths, batches, modes, metrics, meter, on_row, deadline, previous):
        model = spec if isinstance(spec, nn.Module) else spec()
        model.to(self.device)
        opt = in_backward = None   # lr 0: the weights stay put, the optimizer state is real
        if self.optimizer == "adamw_in_backward":
            from ..training.in_backward import OptimizerInBackward
            in_backward = OptimizerInBackward(model.parameters(), torch.optim.AdamW, lr=0.0, foreach=False)
        elif self.optimizer:
            opt = torch.optim.AdamW(model.parameters(), lr=0.0)
        stopped = _stopped_modes(previous, name)
        done = {_key(r) for r in previous if r.get("status") in DONE}
        rows, history = [], [r for r in previous if r.get("model") == name]
        for seq_len, batch in zip(lengths, batches):
            for mode in modes:
                if (name, mode, seq_len, batch) in done:
                    continue
                row = self._row(name, model, mode, seq_len, batch, stopped, metrics, meter, opt, deadline,
                                history + rows)
                rows.append(row)
                if row["status"] in ("oom", "error"):
                    stopped[mode] = (row["tokens"], f"{row['status']} at {seq_len}")
                if on_row is not None:
                    on_row(row)
        if in_backward is not None:
            in_backward.remove()
        del model, opt, in_backward
        free_memory(self.device)
        return rows

    def _row(self, name, model, mode, seq_len, batch, stopped, metrics, meter, opt, deadline, history) -> dict:
        row = self._base_row(name, model, mode, seq_len, batch)
        skip = self._skip_reason(model, mode, seq_len, batch, stopped, deadline, history, name)
        if skip:
            row.update(status="skipped", error=skip)
            return row
        tokens = seq_len * batch
        long = tokens >= self.long_tokens
        warm_len = min(seq_len, self.long_warmup_tokens) if long else seq_len
        vocab = _vocab_size(model)
        ids = random_ids(vocab, batch, seq_len, self.device)
        warm = ids if warm_len == seq_len else random_ids(vocab, batch, warm_len, self.device, seed=1)
        repeats = 1 if long else self.repeats
        with sdpa_context(self.sdpa_backend, fallbacks=mode in PEER_MODES):
            row["sdpa_backend"] = self._backend(model, mode, seq_len, batch)
            res = _measure_in_mode(model, mode, ids, self.amp_dtype, repeats, warm, opt, meter)
        row.update(status=res.status, error=res.error, loss=res.loss, warmup_tokens=warm_len * batch,
                   timed_steps=repeats, step_times=res.times)
        if res.status == "ok":
            _fill_metrics(row, res, tokens, metrics, meter)
        return row

    def _base_row(self, name, model, mode, seq_len, batch) -> dict:
        cfg = getattr(model, "config", None)
        return {
            "model": name, "mode": mode or "as_is", "seq_len": seq_len, "batch": batch, "tokens": seq_len * batch,
            "layers": getattr(cfg, "num_layers", None), "d_model": getattr(cfg, "d_model", None),
            "params": sum(p.numel() for p in model.parameters()),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32",
            "optimizer": (self.optimizer if isinstance(self.optimizer, str) else "adamw") if self.optimizer else None,
            "sdpa_backend": None,
            "status": None, "error": None, "step_s": None, "tokens_per_s": None, "peak_gib": None,
            "static_gib": None, "energy_j_per_token": None, "energy_note": None,
            "note": PEER_NOTES.get(mode), **self.env,
        }

    def _skip_reason(self, model, mode, seq_len, batch, stopped, deadline, history, name) -> str | None:
        if mode in stopped and seq_len * batch >= stopped[mode][0]:
            return f"stopped after {stopped[mode][1]}"
        if mode in PEER_MODES and seq_len > self.peer_max_len:
            return f"peers run only up to {self.peer_max_len}"
        if mode == "ac_offload" and self.offload_max_host_gib is not None:
            need = _offload_host_gib(model, seq_len * batch)
            if need > self.offload_max_host_gib:
                return f"would pin ~{need:.0f} GiB of host memory (limit {self.offload_max_host_gib:.0f} GiB)"
        if deadline is None:
            return None
        need, left = self._predict_seconds(history, name, mode, seq_len * batch), deadline - time.monotonic()
        if need > left:
            return f"time budget: needs ~{need:.0f} s, {max(left, 0):.0f} s left"
        return None

    def _predict_seconds(self, rows, name, mode, tokens) -> float:
        """Seconds a row will take (warm-up included), from this mode's finished rows at no more tokens."""
        prev = [r for r in rows if r["model"] == name and r["mode"] == (mode or "as_is") and r["status"] == "ok"
                and r.get("step_s") and r["tokens"] <= tokens]
        step = predict_step_seconds([(r["tokens"], r["step_s"]) for r in prev], tokens)
        if tokens >= self.long_tokens:
            return step * (1 + (self.long_warmup_tokens / tokens) ** 2)
        return step * (1 + self.repeats)

    def _backend(self, model, mode, seq_len, batch) -> str:
        """The SDPA back end(s) this mode runs, probed once per length on the first block's attention."""
        if mode == "memcnn":
            return self._probe(model, seq_len, batch, None) + " (fp32)"
        base = self._probe(model, seq_len, batch, self.amp_dtype)
        if mode == "revlib" and self.amp_dtype is not None:
            return f"{base} forward, {self._probe(model, seq_len, batch, None)} recompute (fp32)"
        return base

    def _probe(self, model, seq_len, batch, amp_dtype) -> str:
        key = (id(model), seq_len, batch, amp_dtype)
        if key not in self._probes:
            seq = getattr(model, "blocks", None)
            width = getattr(getattr(model, "config", None), "d_model", None)
            if not isinstance(seq, ReversibleSequence) or not width:
                return "not probed (needs model.blocks, a ReversibleSequence, and config.d_model)"
            x = torch.randn(batch, seq_len, width, device=self.device, dtype=seq.stream_dtype or torch.float32)
            try:
                self._probes[key] = probe_backend(seq.blocks[0].coupling.f, x, amp_dtype)
            except RuntimeError as e:  # recorded in the row; the step itself will fail the same way
                self._probes[key] = f"probe failed: {str(e).splitlines()[0][:120]}"
            del x
        return self._probes[key]

    # ------------------------------------------------------------ maximum context

    def max_context(self, model: nn.Module, mode: str | None, start: int = 8192, limit: int = 2 ** 21,
                    granularity: int = 4096, max_seconds: float | None = None,
                    on_try: Callable[[dict], None] | None = None) -> dict:
        """Longest sequence (batch 1) whose training step fits: double from ``start`` until a step
        runs out of memory, then bisect to ``granularity``. One step per try, no warm-up. Stops
        early (and says so) when the next try is predicted to overrun ``max_seconds``."""
        if mode is not None:
            check_mode(mode)
        deadline = time.monotonic() + max_seconds if max_seconds else None
        model.to(self.device)
        tries, lo, hi, stop = [], None, None, None
        seq = start
        while seq is not None:
            if deadline is not None and tries and _predict_try(tries, seq) > deadline - time.monotonic():
                stop = f"time budget: the try at {seq} was predicted to overrun max_seconds"
                break
            if mode == "ac_offload" and self.offload_max_host_gib is not None \
                    and _offload_host_gib(model, seq) > self.offload_max_host_gib:
                stop = f"the try at {seq} would pin ~{_offload_host_gib(model, seq):.0f} GiB of host memory"
                break
            t = self._try(model, mode, seq)
            tries.append(t)
            if on_try is not None:
                on_try(t)
            if t["status"] == "error":
                stop = f"error at {seq}: {t['error']}"
                break
            lo, hi = (seq, hi) if t["status"] == "ok" else (lo, seq)
            seq = _next_try(lo, hi, limit, granularity)
        return {"mode": mode or "as_is", "max_ok": lo, "first_fail": hi, "granularity": granularity,
                "limit": limit, "stopped": stop, "tries": tries, **self.env}

    def _try(self, model, mode, seq_len) -> dict:
        ids = random_ids(_vocab_size(model), 1, seq_len, self.device)
        t0 = time.monotonic()
        with sdpa_context(self.sdpa_backend, fallbacks=mode in PEER_MODES):
            res = _measure_in_mode(model, mode, ids, self.amp_dtype, 1, None)
        return {"seq_len": seq_len, "status": res.status, "seconds": time.monotonic() - t0,
                "peak_gib": res.peak_gib, "error": res.error}


# ---------------------------------------------------------------- helpers

def _pair(lengths, batches) -> tuple[list[int], list[int]]:
    lengths = [int(s) for s in lengths]
    batches = [int(batches)] * len(lengths) if isinstance(batches, int) else [int(b) for b in batches]
    if len(batches) != len(lengths):
        raise ValueError(f"batch_sizes pairs with sequence_lengths: got {len(batches)} batch sizes for "
                         f"{len(lengths)} lengths ({lengths})")
    bad = [(s, b) for s, b in zip(lengths, batches) if s < 1 or b < 1]
    if bad:
        raise ValueError(f"sequence lengths and batch sizes must be positive, got {bad}")
    return lengths, batches


def _check_metrics(metrics) -> set:
    metrics = set(metrics)
    unknown = metrics - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; expected some of {METRICS}")
    return metrics


def _fill_metrics(row, res, tokens, metrics, meter) -> None:
    if "throughput" in metrics:
        row.update(step_s=res.step_s, tokens_per_s=tokens / res.step_s)
    if "memory" in metrics:
        row.update(peak_gib=res.peak_gib, static_gib=res.static_gib)
    if "energy" in metrics:
        if res.energy_j is None:
            row["energy_note"] = meter.reason if meter is not None else "not measured"
        else:
            row["energy_j_per_token"] = res.energy_j / (tokens * len(res.times))
            row["energy_note"] = f"NVML counter over {sum(res.times):.2f} s"


def _key(row) -> tuple:
    mode = None if row["mode"] == "as_is" else row["mode"]
    return row["model"], mode, row["seq_len"], row["batch"]


def _stopped_modes(previous, name) -> dict:
    """Modes of ``name`` that already ran out of memory in ``previous`` rows, and where."""
    stopped = {}
    for r in sorted(previous, key=lambda r: -r["tokens"]):
        if r["model"] == name and r.get("status") == "oom":
            stopped[_key(r)[1]] = (r["tokens"], f"{r['status']} at {r['seq_len']}")
    return stopped


def _measure_in_mode(model, mode, ids, amp_dtype, repeats, warm, opt=None, meter=None) -> StepResult:
    """``measure_step`` with ``mode`` applied; a mode that cannot be set up (a peer library missing or
    refusing the blocks) comes back as an error row quoting why."""
    stack = contextlib.ExitStack()
    try:
        if mode is not None:
            stack.enter_context(apply_mode(model, mode))
    except Exception as e:  # noqa: BLE001 - recorded in the row
        return StepResult(status="error", error=f"setting up mode {mode!r}: {type(e).__name__}: {e}"[:500])
    with stack:
        return measure_step(model, ids, amp_dtype, repeats, warm, opt, meter)


def _offload_host_gib(model, tokens: int) -> float:
    """Pinned host memory ``ac_offload`` takes: each block's two input streams, kept per layer."""
    seq = stack_of(model)
    itemsize = torch.empty(0, dtype=seq.stream_dtype or torch.float32).element_size()
    return 2 * len(seq.blocks) * tokens * _stream_width(model) * itemsize / 2 ** 30


def _vocab_size(model) -> int:
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None) or getattr(model, "vocab_size", None)
    if not vocab:
        raise ValueError(f"{type(model).__name__} has no config.vocab_size; benchmarked models need one "
                         "to draw token ids")
    return int(vocab)


def _stream_width(model) -> int:
    cfg = getattr(model, "config", None)
    width = getattr(cfg, "d_model", None)
    if not width:
        raise ValueError(f"{type(model).__name__} has no config.d_model (the stream width)")
    return int(width)


def predict_step_seconds(points: list[tuple[int, float]], tokens: int, margin: float = 1.3) -> float:
    """Step time at ``tokens`` from measured ``(tokens, seconds)``: through the two longest points,
    ``t = a·n + b·n²`` (projections and FFN grow linearly, attention quadratically), times ``margin``;
    from one point, all-quadratic (an over-estimate); from none, 0 (run it and see)."""
    pts = sorted(set(points))
    if not pts:
        return 0.0
    (n2, t2) = pts[-1]
    if len(pts) == 1 or pts[-2][0] == n2:
        return t2 * (tokens / n2) ** 2
    (n1, t1) = pts[-2]
    b = max((t2 / n2 - t1 / n1) / (n2 - n1), 0.0)
    a = max(t2 / n2 - b * n2, 0.0)
    return margin * (a * tokens + b * tokens ** 2)


def _predict_try(tries, seq_len) -> float:
    return predict_step_seconds([(t["seq_len"], t["seconds"]) for t in tries if t["status"] == "ok"], seq_len) \
        or tries[-1]["seconds"] * (seq_len / tries[-1]["seq_len"]) ** 2


def _next_try(lo, hi, limit, granularity) -> int | None:
    """Doubling while nothing has failed (halving while nothing has fit), then bisection between
    the longest fit and the shortest failure, to ``granularity``. None: done."""
    if hi is None:
        nxt = min(lo * 2, limit)
        return nxt if nxt > lo else None
    if lo is None:
        nxt = hi // 2 // granularity * granularity
        return nxt if nxt >= granularity else None
    mid = (lo + hi) // 2 // granularity * granularity
    return mid if lo < mid < hi else None
