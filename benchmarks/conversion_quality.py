"""Does BDIA fine-tuning of a converted model learn as well as ordinary fine-tuning?

Pre-trains a small GPT-2-shaped model (Hugging Face GPT2LMHeadModel) on one half of the Python standard
library's source, then fine-tunes copies of it on the other half: ordinarily, and after
``convert_to_reversible`` with gamma0 = 1/2, 1/4, 1/8. Held-out loss is measured in eval mode, where
every variant is exactly the plain model. Writes a markdown table, a JSON and a plot.

    python -m benchmarks.conversion_quality --out benchmarks/results
    python -m benchmarks.conversion_quality --device cuda --bf16 --layers 12 --d-model 768 --heads 12 \
        --seq-len 1024 --batch 8 --pretrain-steps 2000 --finetune-steps 500 --commit C --out $OUT   # GPU
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import time

import torch

from revnet_zero import convert_to_reversible
from revnet_zero.benchmarks.measure import gpu_slug
from revnet_zero.data import ByteTokenizer, PackedDataset
from revnet_zero.demo import stdlib_sources

DEVICE = torch.device("cpu")
AMP = None   # autocast dtype for training and eval (--bf16 on CUDA)


def batches(data: PackedDataset, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.stack([data[int(i)] for i in torch.randint(len(data), (batch,), generator=g)]).to(DEVICE)


def autocast():
    return torch.autocast(DEVICE.type, dtype=AMP or torch.float32, enabled=AMP is not None)


@torch.no_grad()
def eval_loss(model, data: PackedDataset, batch: int = 16, n: int = 8) -> float:
    model.eval()
    with autocast():
        losses = [model(input_ids=x, labels=x).loss.item() for x in batches(data, batch, n, seed=123)]
    model.train()
    return sum(losses) / len(losses)


def train(model, data, eval_data, steps, lr, batch, seed, every):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    curve = [(0, eval_loss(model, eval_data))]
    t0 = time.perf_counter()
    for step, x in enumerate(batches(data, batch, steps, seed), start=1):
        with autocast():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % every == 0:
            curve.append((step, eval_loss(model, eval_data)))
    return curve, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--max-chars", type=int, default=3_000_000, help="stdlib source characters to use")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--commit", default=None, help="commit to record (the GPU machine's copy has no .git)")
    a = ap.parse_args()
    global DEVICE, AMP
    DEVICE, AMP = torch.device(a.device), (torch.bfloat16 if a.bf16 else None)
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    if DEVICE.type == "cpu":
        torch.set_num_threads(2)
    tok = ByteTokenizer()
    texts = stdlib_sources(max_chars=a.max_chars, seed=0).texts
    half = len(texts) // 2
    pre = PackedDataset.from_texts(texts[:half], tok, a.seq_len)
    fine, fine_eval = PackedDataset.from_texts(texts[half:], tok, a.seq_len).split(0.05)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=a.seq_len, n_embd=a.d_model, n_layer=a.layers,
                     n_head=a.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base = GPT2LMHeadModel(cfg).to(DEVICE)
    pre_curve, pre_s = train(base, pre, fine_eval, a.pretrain_steps, 1e-3, a.batch, seed=1, every=100)
    print(f"pre-trained {a.pretrain_steps} steps in {pre_s:.0f} s: held-out loss on the fine-tuning corpus "
          f"{pre_curve[-1][1]:.3f}", flush=True)
    runs = {}
    variants = [("ordinary", None), ("bdia gamma0=1/2", 0.5), ("bdia gamma0=1/4", 0.25), ("bdia gamma0=1/8", 0.125)]
    for name, gamma0 in variants:
        model = copy.deepcopy(base)
        if gamma0 is not None:
            model = convert_to_reversible(model, gamma0=gamma0, verbose=False, inplace=True)
        curve, secs = train(model, fine, fine_eval, a.finetune_steps, 3e-4, a.batch, seed=2, every=25)
        runs[name] = {"gamma0": gamma0, "curve": curve, "seconds": secs}
        print(f"{name}: held-out loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f} in {secs:.0f} s", flush=True)
    write(a, runs, pre_curve, cfg)


def write(a, runs, pre_curve, cfg):
    os.makedirs(a.out, exist_ok=True)
    date = datetime.date.today().isoformat()
    where = "cpu" if DEVICE.type == "cpu" else gpu_slug(torch.cuda.get_device_name(DEVICE))
    stem = os.path.join(a.out, f"conversion_quality_{where}_{date}")
    commit = a.commit
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    device = "cpu (2 threads)" if DEVICE.type == "cpu" else torch.cuda.get_device_name(DEVICE)
    meta = {"device": device, "amp": str(AMP).replace("torch.", "") if AMP else "fp32",
            "torch": torch.__version__, "commit": commit, "date": date,
            "model": f"GPT2LMHeadModel n_layer={cfg.n_layer} n_embd={cfg.n_embd} n_head={cfg.n_head} "
                     f"vocab={cfg.vocab_size} (bytes)", "seq_len": a.seq_len, "batch": a.batch,
            "pretrain_steps": a.pretrain_steps, "finetune_steps": a.finetune_steps}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "pretrain_curve": pre_curve, "runs": runs}, f, indent=1)
    ordinary = runs["ordinary"]
    lines = [f"# BDIA fine-tuning vs ordinary fine-tuning ({meta['model']})", "",
             *(f"- {k}: {v}" for k, v in meta.items() if k != "model"), "",
             "Pre-trained on one half of the stdlib source, fine-tuned on the other half (AdamW 3e-4); held-out "
             "loss (nats per byte) measured in eval mode, where every variant is exactly the plain model.", "",
             "| variant | loss before | loss after | vs ordinary | seconds | vs ordinary |",
             "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['curve'][0][1]:.4f} | {r['curve'][-1][1]:.4f} | "
                     f"{r['curve'][-1][1] - ordinary['curve'][-1][1]:+.4f} | {r['seconds']:.1f} | "
                     f"{r['seconds'] / ordinary['seconds']:.2f}x |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in runs.items():
        ax.plot(*zip(*r["curve"]), label=name, marker="o", ms=3)
    ax.set(xlabel="fine-tuning step", ylabel="held-out loss (nats/byte)", title="BDIA vs ordinary fine-tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)


if __name__ == "__main__":
    main()
