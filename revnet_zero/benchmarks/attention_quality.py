"""What each attention variant costs in quality, on a CPU: two measurements.

1. Language modelling: the same tiny reversible GPT (same seed, data, order and steps) trained on the
   Python standard library's sources with each attention; held-out loss (nats per byte) in a table and
   a plot of held-out loss against step.
2. Long-range recall at the attention op (no training): ``pairs`` keys planted at random positions in
   the first half of a 4k-16k sequence of random filler keys, each with its own value; the last
   ``pairs`` queries each equal one planted key. A query counts as recalled when its output is closer
   (cosine) to its pair's value than to every other pair's value. Every planted pair lies further back
   than the window, so this asks: can the variant reach past its window, and how sharply?

    python -m revnet_zero.benchmarks.attention_quality --out benchmarks/results
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import ByteTokenizer, PackedDataset
from ..models import ReversibleGPT, TransformerConfig
from ..ops import random_features as rf
from ..ops.hierarchical_attention import HierarchySpec, hierarchical_chunked
from ..ops.window_attention import sliding_window_chunked

WINDOW = 16   # LM: window and local window, in bytes


def lm_variants() -> dict[str, dict]:
    return {
        "softmax (exact)": dict(attention="softmax"),
        f"sliding_window w={WINDOW}": dict(attention="sliding_window", attention_window=WINDOW),
        f"hierarchical w={WINDOW} r=(4,16)": dict(attention="hierarchical", local_window=WINDOW,
                                                  compression_ratios=(4, 16), hierarchy_levels=2),
        "rational_fourier gaussian m=64": dict(attention="rational_fourier", rf_num_features=64),
        "rational_fourier cauchy m=64": dict(attention="rational_fourier", rf_kernel="cauchy", rf_num_features=64),
    }


def lm_data(seq_len: int, max_chars: int):
    from ..demo import stdlib_sources
    corpus = stdlib_sources(max_chars, seed=0)
    return PackedDataset.from_texts(corpus.texts, ByteTokenizer(), seq_len).split(0.05)


@torch.no_grad()
def held_out_loss(model, data, batch: int) -> float:
    model.eval()
    losses = [model(torch.stack([data[j] for j in range(i, min(i + batch, len(data)))])).loss.item()
              for i in range(0, len(data), batch)]
    model.train()
    return sum(losses) / len(losses)


def train_lm(overrides: dict, train, val, steps: int, batch: int, eval_every: int, seq_len: int) -> dict:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=ByteTokenizer.vocab_size, num_layers=2, d_model=64, num_heads=4, d_ff=172, max_seq_len=seq_len,
                            **overrides)
    model = ReversibleGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    curve, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        idx = order[(torch.arange(batch) + (step - 1) * batch) % len(train)]
        loss = model(torch.stack([train[int(i)] for i in idx])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % eval_every == 0 or step == steps:
            curve.append((step, held_out_loss(model, val, 16)))
    return {"held_out_loss": curve[-1][1], "curve": curve, "train_loss_last": loss.item(),
            "seconds": time.perf_counter() - t0}


def recall_probe(S: int, window: int, pairs: int = 32, hd: int = 32, sharpness: float = 16.0, seed: int = 0) -> dict:
    """Fraction of the ``pairs`` end queries that recall their planted value, per variant."""
    g = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(1, 1, S, hd, generator=g), dim=-1) * math.sqrt(hd)   # filler: logits ~ N(0, 1)
    v = torch.randn(1, 1, S, hd, generator=g)
    pos = torch.randperm(S // 2 - window, generator=g)[:pairs]
    keys = F.normalize(torch.randn(pairs, hd, generator=g), dim=-1)
    k[0, 0, pos] = keys * math.sqrt(hd)                     # planted keys: same norm as the filler
    q = torch.randn(1, 1, S, hd, generator=g)
    q[0, 0, S - pairs:] = keys * sharpness                  # logit with its own key: sharpness; others ~ N(0, sharpness^2/hd)
    spec = HierarchySpec(window, (16, 64, 256))
    w = rf.draw_frequencies("gaussian", 256, hd, torch.Generator().manual_seed(1))
    wc = rf.draw_frequencies("cauchy", 256, hd, torch.Generator().manual_seed(1))
    outs = {
        "softmax (exact)": F.scaled_dot_product_attention(q, k, v, is_causal=True),
        f"sliding_window w={window}": sliding_window_chunked(q, k, v, window),
        f"hierarchical w={window} r=(16,64,256)": hierarchical_chunked(spec, q, k, v),
        "rational_fourier gaussian m=256": rf.rf_attention(q, k, v, w, "gaussian"),
        "rational_fourier cauchy m=256": rf.rf_attention(q, k, v, wc, "cauchy"),
    }
    want = v[0, 0, pos]                                                         # (pairs, hd)
    result = {}
    for name, out in outs.items():
        got = F.normalize(out[0, 0, S - pairs:], dim=-1) @ F.normalize(want, dim=-1).t()   # (pairs, pairs)
        result[name] = (got.argmax(-1) == torch.arange(pairs)).float().mean().item()
    return result


def plot(lm: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in lm.items():
        ax.plot(*zip(*r["curve"]), "o-", ms=3, label=name)
    ax.set(xlabel="optimizer step", ylabel="held-out loss (nats per byte)",
           title="Tiny reversible GPT on the Python stdlib, one attention each")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m revnet_zero.benchmarks.attention_quality", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for attention_quality_cpu_<date>.{md,json,png}")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-chars", type=int, default=1_000_000, help="bytes of stdlib source to read")
    p.add_argument("--eval-sequences", type=int, default=64, help="held-out sequences scored (the first ones)")
    p.add_argument("--probe-lengths", default="4096,8192,16384")
    p.add_argument("--probe-window", type=int, default=512)
    args = p.parse_args(argv)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out, stem = Path(args.out), f"attention_quality_cpu_{date}"
    out.mkdir(parents=True, exist_ok=True)
    train, val = lm_data(args.seq_len, args.max_chars)
    val = torch.stack([val[i] for i in range(min(args.eval_sequences, len(val)))])
    lm = {}
    for name, overrides in lm_variants().items():
        lm[name] = train_lm(overrides, train, val, args.steps, args.batch, max(1, args.steps // 10), args.seq_len)
        print(f"{name}: held-out {lm[name]['held_out_loss']:.4f} ({lm[name]['seconds']:.0f} s)", flush=True)
    probe = {S: recall_probe(S, args.probe_window) for S in map(int, args.probe_lengths.split(","))}
    command = "python -m revnet_zero.benchmarks.attention_quality " + " ".join(argv or [])
    result = {"command": command, "torch": torch.__version__, "date": date, "lm": lm, "probe": probe,
              "args": vars(args), "train_sequences": len(train), "val_sequences": len(val)}
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    has_plot = plot(lm, out / f"{stem}.png")
    (out / f"{stem}.md").write_text(report(result, has_plot, stem))
    return result


def report(r: dict, has_plot: bool, stem: str) -> str:
    a = r["args"]
    lines = [f"# Attention variants: quality on CPU ({r['date']}, torch {r['torch']})", "",
             f"Command: `{r['command']}`", "",
             f"## Held-out loss: 2-layer d=64 reversible GPT, bytes, sequences of {a['seq_len']}, "
             f"{a['steps']} steps of batch {a['batch']} (same seed, data and order)", "",
             "| attention | held-out loss (nats/byte) | last train loss | CPU seconds |", "|---|---|---|---|"]
    for name, x in r["lm"].items():
        lines.append(f"| {name} | {x['held_out_loss']:.4f} | {x['train_loss_last']:.4f} | {x['seconds']:.0f} |")
    if has_plot:
        lines += ["", f"![held-out loss]({stem}.png)"]
    names = list(next(iter(r["probe"].values())))
    lines += ["", f"## Recall past the window (op level, no training): 32 planted pairs, all more than "
              f"{a['probe_window']} tokens before their queries; fraction recalled", "",
              "| attention | " + " | ".join(f"{int(S):,} tokens" for S in r["probe"]) + " |",
              "|---|" + "---|" * len(r["probe"])]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{r['probe'][S][name]:.2f}" for S in r["probe"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
