"""Held-out loss of the research couplings and a continuous-depth model against additive coupling.

Byte-level language models on the Python standard library's sources (``revnet_zero.demo``), all with the
same parameter count (within 1%: the FFN width is adjusted), the same data order, optimizer and number
of optimizer steps:

* ``additive``   — ``ReversibleTransformer``, additive coupling, ``--layers`` blocks;
* ``rotation``   — the same with ``coupling='rotation'`` (F and G also output angles);
* ``orthogonal`` — additive, then a learned orthogonal mixing of the two streams per block;
* ``continuous`` — embedding -> ``ContinuousDepthRevNet`` (one shared attention + SwiGLU vector field,
  reversible Heun, ``--ode-steps`` fixed steps) -> RMSNorm -> head.

Writes ``research_quality_<device>_<date>.md`` / ``.json`` / ``.png`` into ``--out``.

    python benchmarks/research_quality.py --out benchmarks/results           # a GPU if there is one
    python benchmarks/research_quality.py --smoke --out /tmp/rq               # seconds (CI)
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from revnet_zero.data import ByteTokenizer, PackedDataset
from revnet_zero.demo import stdlib_sources
from revnet_zero.experimental import ContinuousDepthRevNet
from revnet_zero.models import ReversibleTransformer, TransformerConfig


class ContinuousLM(nn.Module):
    """Embedding (scaled by sqrt(d), as the transformers) -> continuous-depth stack -> RMSNorm -> head."""

    def __init__(self, vocab: int, d_model: int, num_heads: int, d_ff: int, steps: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.net = ContinuousDepthRevNet(d_model=d_model, num_heads=num_heads, d_ff=d_ff, num_steps=steps,
                                         ode_solver="reversible_heun")
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.scale = d_model ** 0.5

    def forward(self, ids, labels=None):
        h = self.norm(self.net(self.embed(ids) * self.scale).hidden)
        logits = self.head(h[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def transformer(vocab, args, coupling, d_ff):
    cfg = TransformerConfig(vocab_size=vocab, num_layers=args.layers, d_model=args.d_model, num_heads=args.heads,
                            d_ff=d_ff, max_seq_len=args.seq, coupling=coupling)
    return ReversibleTransformer(cfg)


def _init(model: nn.Module, depth: int) -> None:
    """The transformers' init (normal 0.02; residual writes scaled by depth) for the continuous model."""
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * depth) if name.endswith(("wo.weight", "w_out.weight")) else 0.02
            nn.init.normal_(p, std=std)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def matched(build, target: int) -> tuple[nn.Module, int]:
    """The model from ``build(d_ff)`` whose parameter count is nearest ``target`` (d_ff a multiple of 8;
    the count is linear in d_ff, so two builds give the line)."""
    n8, n16 = n_params(build(8)), n_params(build(16))
    d_ff = max(8, 8 * round((8 + (target - n8) * 8 / (n16 - n8)) / 8))
    torch.manual_seed(0)
    return build(d_ff), d_ff


def loss_of(model, ids):
    ids = ids.to(next(model.parameters()).device)
    out = model(ids, labels=ids) if isinstance(model, ReversibleTransformer) else model(ids)
    return out.loss if hasattr(out, "loss") else out


@torch.no_grad()
def held_out(model, data, batches: int, batch: int) -> float:
    model.eval()
    losses = [loss_of(model, torch.stack([data[j] for j in range(i * batch, (i + 1) * batch)])).item()
              for i in range(min(batches, len(data) // batch))]
    model.train()
    return sum(losses) / len(losses)


def train(name, model, train_set, eval_set, args) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)   # the same batches, in the same order, for every model
    curve, t0, recent = [], time.perf_counter(), []
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / max(1, args.steps // 10)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(train_set), (args.batch,), generator=gen)
        loss = loss_of(model, torch.stack([train_set[int(i)] for i in idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-20:]
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, held_out(model, eval_set, args.eval_batches, args.batch)))
            print(f"{name:10s} step {step:4d}  train {sum(recent) / len(recent):.4f}  held-out {curve[-1][1]:.4f}",
                  flush=True)
    return {"model": name, "params": n_params(model), "train_loss_last20": sum(recent) / len(recent),
            "held_out_loss": curve[-1][1], "curve": curve, "seconds": time.perf_counter() - t0}


def build_models(vocab, args) -> dict:
    torch.manual_seed(0)
    base = transformer(vocab, args, "additive", args.d_ff)
    target = n_params(base)
    models = {"additive": (base, args.d_ff)}
    for coupling in ("rotation", "orthogonal"):
        models[coupling] = matched(lambda f, c=coupling: transformer(vocab, args, c, f), target)
    cont, d_ff = matched(lambda f: ContinuousLM(vocab, args.d_model, args.heads, f, args.ode_steps, args.seq),
                         target)
    _init(cont, args.layers)
    models["continuous"] = (cont, d_ff)
    return models


def device_name(device: str) -> str:
    """'cpu', or the GPU's short name ('h200', 'h100-80gb-hbm3') as in the other result files."""
    if device == "cpu":
        return "cpu"
    return torch.cuda.get_device_name(device).lower().replace("nvidia ", "").replace(" ", "-")


def write(rows, args, out_dir):
    date = datetime.date.today().isoformat()
    name = device_name(args.device)
    stem = os.path.join(out_dir, f"research_quality_{name}_{date}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"date": date, "commit": commit, "torch": torch.__version__, "device": name, "args": vars(args)}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Held-out loss at equal parameters and steps ({name}, {date}, commit {commit}, torch {torch.__version__})",
             "", f"Byte-level LM on Python stdlib sources; {args.steps} AdamW steps of batch {args.batch} x "
             f"{args.seq} bytes, lr {args.lr}, d_model {args.d_model}, {args.layers} layers (continuous: "
             f"{args.ode_steps} reversible-Heun steps of one shared vector field). Loss in nats per byte; held-out: "
             f"{args.eval_batches} batches of the last 2% of sequences. "
             f"Command: `{' '.join(['python', 'benchmarks/research_quality.py'] + (args.argv or []))}`", "",
             "| model | params | d_ff | train loss (last 20 steps) | held-out loss | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['d_ff']} | {r['train_loss_last20']:.4f} | "
                     f"{r['held_out_loss']:.4f} | {r['seconds']:.0f} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
    except ImportError:
        return stem
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ax.plot(*zip(*r["curve"]), "o-", label=f"{r['model']} ({r['params']:,} params)")
    ax.set(xlabel="optimizer step", ylabel="held-out loss (nats per byte)", title="equal parameters and steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    plt.close(fig)
    return stem


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--d-model", type=int, default=96)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--ode-steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--max-chars", type=int, default=3_000_000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps (CI)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.steps, args.batch, args.seq, args.d_model, args.d_ff = 3, 2, 32, 32, 64
        args.eval_every, args.eval_batches, args.max_chars, args.heads = 3, 1, 200_000, 2
    torch.manual_seed(0)
    tok = ByteTokenizer()
    data = PackedDataset.from_texts(stdlib_sources(args.max_chars).texts, tok, args.seq)
    train_set, eval_set = data.split(0.02)
    rows = []
    for name, (model, d_ff) in build_models(tok.vocab_size, args).items():
        torch.manual_seed(0)
        model.to(args.device)
        rows.append({**train(name, model, train_set, eval_set, args), "d_ff": d_ff})
    os.makedirs(args.out, exist_ok=True)
    print("wrote", write(rows, args, args.out))
    return rows


if __name__ == "__main__":
    main()
