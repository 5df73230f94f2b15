"""Results on disk: every row as JSON, a markdown table with ratios, derived figures, PNG plots."""
from __future__ import annotations

import json
import os
import statistics

# ---------------------------------------------------------------- JSON

SECTIONS = ("rows", "sdpa", "grads", "maxctx")  # what one results file holds, besides "meta"


def write_json(path: str, results: dict) -> None:
    """``results``: ``meta`` and the ``SECTIONS`` (lists of dicts). Written atomically (write, then
    rename): a run killed mid-write leaves the last complete file."""
    unknown = set(results) - set(SECTIONS) - {"meta"}
    if unknown:
        raise ValueError(f"unknown results sections {sorted(unknown)}; expected meta and {SECTIONS}")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": results.get("meta", {}), **{k: results.get(k, []) for k in SECTIONS}}, f,
                  indent=1, default=str)
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError(f"{path} is not a benchmark results file (no 'rows' key)")
    return {"meta": data.get("meta", {}), **{k: data.get(k, []) for k in SECTIONS}}


MERGE_KEYS = {"rows": ("model", "mode", "seq_len", "batch"), "sdpa": ("backend", "seq_len"),
              "grads": ("model", "mode", "reference", "seq_len", "batch"), "maxctx": ("model", "mode")}


def merge_rows(old: list[dict], new: list[dict], section: str = "rows") -> list[dict]:
    """``old`` entries replaced by the ``new`` one with the same key (``MERGE_KEYS[section]``)."""
    keys = MERGE_KEYS[section]
    seen = {tuple(r.get(k) for k in keys) for r in new}
    return [r for r in old if tuple(r.get(k) for k in keys) not in seen] + new


# ---------------------------------------------------------------- derived figures

def bytes_per_token(rows: list[dict]) -> list[dict]:
    """Least-squares slope of peak memory over tokens, per (model, mode), from rows that ran (>= 2)."""
    out = []
    for (model, mode), pts in _groups(rows).items():
        if len(pts) < 2:
            continue
        xs = [r["tokens"] for r in pts]
        ys = [r["peak_gib"] * 2 ** 30 for r in pts]
        slope, intercept = _least_squares(xs, ys)
        out.append({"model": model, "mode": mode, "bytes_per_token": slope, "intercept_gib": intercept / 2 ** 30,
                    "points": len(pts), "tokens": [min(xs), max(xs)]})
    return out


def depth_ratios(rows: list[dict]) -> list[dict]:
    """Peak memory at the most layers over the fewest, per (mode, length), for rows differing only in
    depth; also the same ratio for the activation part (peak minus weights/optimizer state)."""
    by: dict = {}
    for r in _ok(rows):
        if r.get("layers") is not None:
            by.setdefault((r["mode"], r["seq_len"], r["batch"], r.get("d_model")), {})[r["layers"]] = r
    out = []
    for (mode, seq_len, batch, _), per in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if len(per) < 2:
            continue
        lo, hi = per[min(per)], per[max(per)]
        act = (hi["peak_gib"] - hi["static_gib"]) / max(lo["peak_gib"] - lo["static_gib"], 1e-12) \
            if hi.get("static_gib") is not None and lo.get("static_gib") is not None else None
        out.append({"mode": mode, "seq_len": seq_len, "batch": batch, "layers": [lo["layers"], hi["layers"]],
                    "peak_gib": [lo["peak_gib"], hi["peak_gib"]], "peak_ratio": hi["peak_gib"] / lo["peak_gib"],
                    "activation_ratio": act})
    return out


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok" and r.get("peak_gib") is not None]


def _groups(rows) -> dict:
    groups: dict = {}
    for r in _ok(rows):
        groups.setdefault((r["model"], r["mode"]), []).append(r)
    return groups


def _least_squares(xs, ys) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError(f"a slope needs two different lengths, got {sorted(set(xs))}")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


# ---------------------------------------------------------------- markdown

def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else ""


def _status_cell(r: dict) -> str:
    if r["status"] == "ok":
        return "ok"
    if r["status"] == "skipped":
        return f"skipped ({r['error']})"
    return f"{r['status']}: {(r.get('error') or '')[:80]}".replace("|", "/")


def to_markdown(results: dict, title: str) -> str:
    """The whole results file as markdown: the facts, then a table per non-empty section."""
    everything = [r for k in SECTIONS for r in results.get(k, [])]
    parts = [header(everything, title)]
    if results.get("sdpa"):
        parts += ["## SDPA back ends", sdpa_table(results["sdpa"], results.get("meta", {}).get("sdpa_backend"))]
    if results.get("grads"):
        parts += ["## Gradients against the reference mode", grads_table(results["grads"])]
    if results.get("rows"):
        parts += ["## Training step, side by side", modes_table(results["rows"]), derived_tables(results["rows"])]
    if results.get("maxctx"):
        parts += ["## Longest context that fits", maxctx_table(results["maxctx"])]
    return "\n\n".join(p for p in parts if p).rstrip() + "\n"


def header(rows: list[dict], title: str) -> str:
    keys = ("gpu", "torch", "cuda", "commit", "date", "amp", "optimizer", "alloc_conf", "memory_cap_gib")
    facts = {k: sorted({str(r[k]) for r in rows if k in r}) for k in keys}
    return "\n".join([f"# {title}", ""] + [f"- {k}: {', '.join(v)}" for k, v in facts.items() if v])


def modes_table(rows: list[dict]) -> str:
    """One line per row; time and memory also as ratios to ``standard`` at the same model/length/batch."""
    ref = {(r["model"], r["seq_len"], r["batch"]): r for r in rows if r["mode"] == "standard" and r["status"] == "ok"}
    out = ["| model | layers | mode | seq | batch | status | step s | vs standard | tokens/s | peak GiB | "
           "vs standard | weights+opt GiB | J/token | SDPA |",
           "|" + "---|" * 14]
    for r in sorted(rows, key=lambda r: (r["model"], r["seq_len"], r["batch"])):
        s = ref.get((r["model"], r["seq_len"], r["batch"]), {})
        out.append("| " + " | ".join([
            str(r["model"]), str(r.get("layers") or ""), r["mode"], str(r["seq_len"]), str(r["batch"]), _status_cell(r),
            _fmt(r.get("step_s"), ".3f"), _ratio(r.get("step_s"), s.get("step_s")),
            _fmt(r.get("tokens_per_s"), ",.0f"), _fmt(r.get("peak_gib"), ".2f"),
            _ratio(r.get("peak_gib"), s.get("peak_gib")), _fmt(r.get("static_gib"), ".2f"),
            _fmt(r.get("energy_j_per_token"), ".3g"), str(r.get("sdpa_backend") or "")]) + " |")
    return "\n".join(out)


def derived_tables(rows: list[dict]) -> str:
    parts = []
    slopes = bytes_per_token(rows)
    if slopes:
        parts += ["### Bytes per token (least-squares slope of peak memory over tokens)", "",
                  "| model | mode | bytes/token | intercept GiB | points | tokens |", "|---|---|---|---|---|---|"]
        parts += [f"| {s['model']} | {s['mode']} | {s['bytes_per_token']:,.0f} | {s['intercept_gib']:.2f} | "
                  f"{s['points']} | {s['tokens'][0]}–{s['tokens'][1]} |" for s in slopes]
        parts.append("")
    depth = depth_ratios(rows)
    if depth:
        parts += ["### Depth independence (peak at the most layers / at the fewest)", "",
                  "| mode | seq | layers | peak GiB | peak ratio | activation ratio |", "|---|---|---|---|---|---|"]
        parts += [f"| {d['mode']} | {d['seq_len']} | {d['layers'][0]} → {d['layers'][1]} | "
                  f"{d['peak_gib'][0]:.2f} → {d['peak_gib'][1]:.2f} | {d['peak_ratio']:.2f} | "
                  f"{_fmt(d['activation_ratio'], '.2f')} |" for d in depth]
        parts.append("")
    notes = sorted({f"- {r['mode']}: {r['note']}" for r in rows if r.get("note")})
    energy = sorted({f"- energy: {r['energy_note']}" for r in rows if r.get("energy_note") and
                     r.get("energy_j_per_token") is None})
    if notes or energy:
        parts += ["### Notes", ""] + notes + energy
    return "\n".join(parts).rstrip()


def sdpa_table(rows: list[dict], chosen: str | None) -> str:
    out = [f"Chosen for every mode (least forward + backward time over the lengths): **{chosen}**", "",
           "| seq | back end | fwd ms | bwd ms | fwd TFLOP/s | bwd TFLOP/s | error |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["seq_len"], r["backend"])):
        out.append(f"| {r['seq_len']} | {r['backend']} | {_fmt(_ms(r.get('fwd_s')), '.2f')} | "
                   f"{_fmt(_ms(r.get('bwd_s')), '.2f')} | {_fmt(r.get('fwd_tflops'), '.0f')} | "
                   f"{_fmt(r.get('bwd_tflops'), '.0f')} | {r.get('error') or ''} |")
    return "\n".join(out)


def _ms(s):
    return None if s is None else s * 1000


def grads_table(rows: list[dict]) -> str:
    out = ["Relative error per parameter, ‖g_mode − g_ref‖ / ‖g_ref‖; the floor is the reference mode run "
           "twice (kernel non-determinism).", "",
           "| mode | ref | seq | amp | status | loss rel diff | max rel err | median rel err | floor max | "
           "floor median | worst parameters |", "|" + "---|" * 11]
    for r in rows:
        worst = ", ".join(f"{n} {e:.1e}" for n, e in (r.get("worst") or []))
        out.append(f"| {r['mode']} | {r['reference']} | {r['seq_len']} | {r.get('amp', '')} | {r['status']} | "
                   f"{_fmt(r.get('loss_rel_diff'), '.1e')} | {_fmt(r.get('max_rel_err'), '.2e')} | "
                   f"{_fmt(r.get('median_rel_err'), '.2e')} | {_fmt(r.get('floor_max'), '.2e')} | "
                   f"{_fmt(r.get('floor_median'), '.2e')} | {worst or (r.get('error') or '')} |")
    return "\n".join(out)


def maxctx_table(results: list[dict]) -> str:
    out = ["| model | mode | longest fit | first failure | granularity | stopped early | tries |",
           "|---|---|---|---|---|---|---|"]
    for r in results:
        tries = "; ".join(f"{t['seq_len']}: {t['status']} {t['seconds']:.0f}s"
                          + (f" {t['peak_gib']:.1f}GiB" if t.get("peak_gib") else "") for t in r["tries"])
        out.append(f"| {r.get('model', '')} | {r['mode']} | {r['max_ok']} | {r['first_fail']} | {r['granularity']} | "
                   f"{r['stopped'] or ''} | {tries} |")
    return "\n".join(out)


# ---------------------------------------------------------------- plots

def plot_metric(rows: list[dict], metric: str, path: str, ylabel: str) -> str:
    """``metric`` against sequence length (log2 x), one line per model/mode; a mode that ran out of
    memory says where in its legend entry."""
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _draw(ax, rows, metric, ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _matplotlib():
    """matplotlib's Figure and Agg canvas (no pyplot: no display, no global state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"plotting benchmark results needs matplotlib (pip install matplotlib): {e}") from e
    return Figure, FigureCanvasAgg


_STYLES = ("-", "--", ":", "-.")


def _draw(ax, rows, metric, ylabel) -> None:
    """One line per (model, mode, batch): a colour per mode, a line style per model."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    lines: dict = {}
    for r in rows:
        lines.setdefault((r["model"], r["mode"], r["batch"]), []).append(r)
    for (model, mode, _batch), rs in lines.items():
        pts = sorted((r["seq_len"], r[metric]) for r in rs if r["status"] == "ok" and r.get(metric) is not None)
        fails = sorted((r["seq_len"], r["status"]) for r in rs if r["status"] in ("oom", "error"))
        label = mode if len(models) == 1 else f"{model} {mode}"
        if fails:
            label += f" ({fails[0][1]} at {_tokens(fails[0][0])})"
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                    color=f"C{modes.index(mode) % 10}", linestyle=_STYLES[models.index(model) % len(_STYLES)])
    lengths = sorted({r["seq_len"] for r in rows})
    ax.set_xscale("log", base=2)
    if lengths:
        ax.set_xticks(lengths, [_tokens(n) for n in lengths])
        ax.minorticks_off()
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)


def _tokens(n: int) -> str:
    """8192 -> '8k', 1048576 -> '1M'."""
    for unit, size in (("M", 2 ** 20), ("k", 2 ** 10)):
        if n >= size and n % (size // 8) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def plot_results(rows: list[dict], path: str = "benchmark_results.png") -> list[str]:
    """Peak memory and tokens/s against length, side by side in one figure at ``path``."""
    Figure, FigureCanvasAgg = _matplotlib()
    if "." not in os.path.basename(path):
        path = f"benchmark_results.{path}"
    fig = Figure(figsize=(13, 4.5))
    FigureCanvasAgg(fig)
    _draw(fig.add_subplot(1, 2, 1), rows, "peak_gib", "peak memory (GiB)")
    _draw(fig.add_subplot(1, 2, 2), rows, "tokens_per_s", "tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return [path]
