"""The demo: train a small reversible GPT on the Python standard library's own source code.

Every machine with Python has the data. In one run it measures the activation memory of reversible vs
standard training for the same model and batch, trains for a bounded time, saves a loss plot and a
checkpoint, and samples some text. ``revnet-zero demo`` runs it; ``run_demo`` is the same from Python.
"""
from __future__ import annotations

import math
import os
import random
import sysconfig
import time
from pathlib import Path

import torch

from .data import ByteTokenizer, PackedDataset, TextCorpus, read_texts
from .models import ReversibleGPT, TransformerConfig
from .training import Trainer, compare_policies
from .training.trainer import resolve_device

MiB = 2 ** 20


def stdlib_sources(max_chars: int, seed: int = 0) -> TextCorpus:
    """Up to ``max_chars`` of the standard library's ``.py`` files (installed packages left out), in
    an order shuffled by ``seed``; files that are not UTF-8 are skipped and listed."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        root = Path(os.__file__).parent
    files = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "dist-packages"} & set(p.parts))
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library folder {root}")
    random.Random(seed).shuffle(files)
    return read_texts(files, max_chars)


def plot_losses(history: list[dict], path: Path) -> None:
    """Training (and evaluation) loss against step, as a PNG."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the loss plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    ax.plot(*zip(*train), label="train")
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out")
    ax.set(xlabel="optimizer step", ylabel="loss (nats per byte)", title="Reversible GPT on the Python stdlib")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seconds_per_step(model, batch, repeats: int = 3) -> float:
    """Seconds of one warm forward + backward (sets the step count of a run bounded by time)."""
    def step():
        model(batch, labels=batch).loss.backward()
        if batch.is_cuda:
            torch.cuda.synchronize(batch.device)
    step()
    times = []
    for _ in range(repeats):  # the fastest: a busy moment on a shared machine should not shorten the plan
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return min(times)


def memory_report(mem: dict, batch_shape: tuple[int, int]) -> str:
    B, S = batch_shape
    how = {"saved_tensors": "bytes of tensors saved for backward in one forward (saved_tensors_hooks, each "
                            "storage once, parameters excluded)",
           "cuda_peak": "torch.cuda.max_memory_allocated during one forward + backward, above weights "
                        "and gradients"}[mem["measure"]]
    ratio = mem["standard"] / max(mem["reversible"], 1)
    return (f"Activation memory, same model and batch ({B} x {S} tokens), measured now as {how}:\n"
            f"  standard training (plain autograd): {mem['standard'] / MiB:9.2f} MiB\n"
            f"  reversible training (recompute):    {mem['reversible'] / MiB:9.2f} MiB   "
            f"({ratio:.1f}x less)")


def _demo_data(tok, seq_len: int, seed: int, echo) -> tuple[PackedDataset, PackedDataset]:
    corpus = stdlib_sources(max_chars=4_000_000, seed=seed)
    train_set, eval_set = PackedDataset.from_texts(corpus.texts, tok, seq_len).split(0.02)
    echo(f"Data: {len(corpus.texts)} standard-library .py files ({corpus.num_bytes / 1e6:.1f} MB, "
         f"{len(corpus.skipped)} skipped as empty or not UTF-8) -> {len(train_set)} train / "
         f"{len(eval_set)} held-out sequences of {seq_len} bytes")
    return train_set, eval_set


def _sample(model, tok, seq_len: int, seed: int) -> str:
    model.eval()
    prompt = torch.tensor([tok.encode("def ")], device=next(model.parameters()).device)
    torch.manual_seed(seed)
    ids = model.generate(prompt, max_new_tokens=min(300, seq_len - 4), temperature=0.8, top_k=40)
    return tok.decode(ids[0].tolist())


def _check_sizes(minutes, **sizes) -> None:
    """ValueError quoting the value, before anything is built or written."""
    if isinstance(minutes, bool) or not (isinstance(minutes, (int, float)) and math.isfinite(minutes) and minutes > 0):
        raise ValueError(f"minutes must be a finite number > 0, got {minutes!r}")
    for name, v in sizes.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def run_demo(out_dir="revnet-zero-demo", minutes: float = 3.0, steps: int | None = None,
             num_layers: int = 4, d_model: int = 256, num_heads: int = 4, seq_len: int = 256,
             batch_size: int = 4, lr: float = 2e-3, device: str | None = None, seed: int = 0,
             progress: bool = True, echo=print) -> dict:
    """Runs the demo and returns what it measured. Training stops after ``steps`` optimizer steps if
    given, else when ``minutes`` are up (the step count for the lr schedule is estimated from a
    timed step)."""
    t_start = time.perf_counter()
    _check_sizes(minutes=minutes, steps=steps, batch_size=batch_size, seq_len=seq_len)
    dev = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)  # the trainer appends; a new demo starts a new file
    torch.manual_seed(seed)
    tok = ByteTokenizer()
    train_set, eval_set = _demo_data(tok, seq_len, seed, echo)

    config = TransformerConfig(vocab_size=tok.vocab_size, num_layers=num_layers, d_model=d_model,
                               num_heads=num_heads, max_seq_len=seq_len)
    model = ReversibleGPT(config).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    echo(f"Model: ReversibleGPT, {num_layers} layers, d_model {d_model}, {n_params / 1e6:.2f} M parameters, "
         f"on {dev}")

    batch = torch.stack([train_set[i] for i in range(batch_size)]).to(dev)
    mem = compare_policies(model, batch)
    echo(memory_report(mem, tuple(batch.shape)))

    budget = minutes * 60
    num_steps = steps or max(10, int(0.95 * budget / seconds_per_step(model, batch)))
    precision = "bf16" if dev.type == "cuda" else "fp32"
    trainer = Trainer(model, lr=lr, batch_size=batch_size, out_dir=str(out), seed=seed, device=str(dev),
                      precision=precision,
                      eval_every=max(1, num_steps // 5), eval_batches=10,
                      log_every=max(1, min(10, num_steps // 20)),
                      progress=progress, warmup_steps=max(1, num_steps // 20))
    echo(f"Training for {'%d steps' % steps if steps else 'up to %.1f minutes (~%d steps)' % (minutes, num_steps)}"
         f", batch {batch_size} x {seq_len} bytes, {precision}")
    summary = trainer.train(train_dataset=train_set, eval_dataset=eval_set, num_steps=num_steps,
                            time_limit_s=None if steps else budget)
    plot_losses(trainer.history, out / "loss.png")

    sample = _sample(model, tok, seq_len, seed)
    (out / "sample.txt").write_text(sample)
    cut = f" (time limit: {summary['step']} of the {num_steps} planned)" if summary["step"] < num_steps else ""
    echo(f"Trained {summary['step']} steps in {summary['seconds']:.0f} s{cut}: train loss {summary['loss']:.3f}, "
         f"held-out loss {summary['eval_loss']:.3f} nats/byte")
    echo(f"Sample (temperature 0.8, top-k 40):\n{'-' * 60}\n{sample}\n{'-' * 60}")
    echo(f"Wrote {out / 'loss.png'}, {summary['checkpoint']}, {out / 'metrics.jsonl'}, {out / 'sample.txt'}")
    echo(f"Total wall time {time.perf_counter() - t_start:.0f} s")
    return {"memory": mem, "summary": summary, "sample": sample, "out_dir": str(out)}
