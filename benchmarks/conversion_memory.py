"""Fine-tuning a converted Hugging Face Llama: memory and speed against ordinary training and
Hugging Face's gradient checkpointing (GPU).

Modes, on one randomly initialised ``LlamaForCausalLM`` (nothing is downloaded):
  ordinary  plain autograd;
  hf_ac     ``model.gradient_checkpointing_enable(use_reentrant=False)`` (keeps each layer's input);
  bdia      ``convert_to_reversible(model, gamma0=...)`` (keeps log2(1/gamma0) bits per element per layer).
Every mode uses the same loss: the fused chunked head + cross-entropy on the last hidden state (the
128k-vocabulary logits never exist), bf16 autocast, batch 1, SDPA attention (cuDNN forced).

Two shapes: ``1b`` (d 2048, 16 layers, 32/8 heads, FFN 8192; float32 weights, AdamW-free step) and
``8b`` (d 4096, 32/8 heads, FFN 14336; bf16 frozen weights, LoRA r=16 on q/k/v/o via peft). The
kept memory per layer is the slope of peak memory over depth (``--depths``) at one length.

    python -m benchmarks.conversion_memory --shape 1b --lengths 8192,32768,131072 --depths 8,16 --commit C --out $OUT
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch
from torch import nn

from revnet_zero import convert_to_reversible
from revnet_zero.benchmarks.measure import cap_memory, environment, free_memory, gpu_slug, measure_step, random_ids
from revnet_zero.benchmarks.sdpa import sdpa_context
from revnet_zero.ops.loss import fused_linear_cross_entropy

GIB = 2**30
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, rope_theta=500000.0),
}


class LossOf(nn.Module):
    """``model(ids)`` -> the fused head + cross-entropy loss on the base model's last hidden state."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        base = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        h = base.model(input_ids=ids).last_hidden_state
        targets = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), -100)], dim=1)
        return fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]), base.lm_head.weight, targets.reshape(-1))


def build(shape: str, layers: int, seq: int, mode: str, gamma0: float, device: torch.device,
          mlp_chunk: int | None = None, offload: bool = False, resident: int | None = None,
          grid_step: str = "auto") -> nn.Module:
    """``resident``: build that many layers and run the first ``layers`` of them; the others stay on the
    GPU, unused, so the measured peak holds a full-depth model's weights (for runs where fewer layers
    stand in for the full depth, valid when memory does not grow with depth: BDIA with ``offload``)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**SHAPES[shape], num_hidden_layers=max(layers, resident or 0),
                      max_position_embeddings=max(seq, 8192), attn_implementation="sdpa")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if shape == "8b" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    idle = list(model.model.layers[layers:])
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.config.use_cache = False
    if mode == "hf_ac":
        if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.24's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif mode == "bdia":
        model = convert_to_reversible(model, gamma0=gamma0, inplace=True, verbose=False, mlp_chunk_size=mlp_chunk,
                                      offload=offload, grid_step=grid_step)
    if shape == "8b":
        import peft
        lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                               lora_dropout=0.0)
        model = peft.get_peft_model(model, lora)
        if mode == "hf_ac":
            model.enable_input_require_grads()   # checkpointing needs a grad-requiring input under LoRA
    model.train()
    wrapped = LossOf(model)
    wrapped.idle_layers = idle   # a plain list: held on the GPU, outside the module tree
    return wrapped


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--modes", default="ordinary,hf_ac,bdia")
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--depths", default="", help="two depths at --slope-seq for the kept bytes per layer")
    p.add_argument("--slope-seq", type=int, default=32768)
    p.add_argument("--gamma0", type=float, default=0.125)
    p.add_argument("--mlp-chunk", type=int, default=None, help="bdia: positions per MLP tile (mlp_chunk_size)")
    p.add_argument("--offload", action="store_true", help="bdia: grid tensors and kept bits in host memory")
    p.add_argument("--resident-layers", type=int, default=None,
                   help="build this many layers, run --layers of them, keep the rest's weights on the GPU")
    p.add_argument("--grid-step", default="auto", choices=("auto", "compiled", "eager", "triton"),
                   help="bdia: how the update and grid step run (convert_to_reversible's grid_step; 'auto' is "
                        "the compiled step on CUDA)")
    p.add_argument("--eager-grid", action="store_true", help="bdia: the eager grid step (--grid-step eager)")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="let PyTorch use at most this much GPU memory (78.4 stands in for an 80 GB H100)")
    p.add_argument("--long-warm-same", action="store_true",
                   help="from 128k: warm up at the measured length too (first use of pinned host blocks and "
                        "allocator segments out of the timed step), not at 8192")
    p.add_argument("--sdpa", default="cudnn")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--topic", default=None)
    a = p.parse_args(argv)
    dev = torch.device("cuda")
    cap_memory(dev, a.memory_cap_gib)
    if a.eager_grid:
        a.grid_step = "eager"
    env = environment(dev, a.commit)
    stem = os.path.join(a.out, f"{a.topic or 'conversion_' + a.shape}_{gpu_slug(env['gpu'])}_{env['date']}")
    os.makedirs(a.out, exist_ok=True)
    runs = [(seq, a.layers) for seq in (int(x) for x in a.lengths.split(",") if x)]
    runs += [(a.slope_seq, int(d)) for d in a.depths.split(",") if d and (a.slope_seq, int(d)) not in runs]
    rows, stopped = [], set()
    for mode in a.modes.split(","):
        for seq, layers in runs:
            if (mode, layers) in stopped:
                rows.append({**env, "mode": mode, "seq": seq, "layers": layers, "status": "skipped",
                             "error": "out of memory at a shorter length"})
                continue
            try:
                model = build(a.shape, layers, seq, mode, a.gamma0, dev, a.mlp_chunk, a.offload, a.resident_layers,
                              a.grid_step)
            except Exception as e:  # noqa: BLE001 - recorded in the row
                rows.append({**env, "mode": mode, "seq": seq, "layers": layers, "status": "error",
                             "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            ids = random_ids(model.lm.config.vocab_size, 1, seq, dev)
            long = seq >= 131072
            warm = random_ids(model.lm.config.vocab_size, 1, seq if a.long_warm_same else 8192, dev, seed=1) if long else ids
            with sdpa_context(a.sdpa):   # the step only: the conversion's float32 probe needs another kernel
                r = measure_step(model, ids, torch.bfloat16, repeats(seq), warm)
            row = {**env, "mode": mode, "shape": a.shape, "seq": seq, "layers": layers, "status": r.status,
                   "step_s": r.step_s, "step_times_s": r.times, "tokens_per_s": seq / r.step_s if r.step_s else None,
                   "peak_gib": r.peak_gib, "static_gib": r.static_gib, "error": r.error,
                   "gamma0": a.gamma0 if mode == "bdia" else None,
                   "mlp_chunk": a.mlp_chunk if mode == "bdia" else None,
                   "offload": a.offload and mode == "bdia", "resident_layers": a.resident_layers,
                   "grid_step": _grid_step(model) if mode == "bdia" else None, **_host_stats()}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in env}), flush=True)
            if r.status == "oom":
                stopped.add((mode, layers))
            del model
            free_memory(dev)
            write(stem, rows, env, a)
    write(stem, rows, env, a)


def repeats(seq: int) -> int:
    """Timed steps per row (their median is the row's step): 5 up to 32k tokens, where one step is
    well under 2 s and two runs of the 8k step (nearly the same code) differed by 6%; 2 below 128k; 1 from 128k."""
    return 5 if seq <= 32768 else 2 if seq < 131072 else 1


def _grid_step(model: nn.Module) -> str:
    """The form the model's grid step ran in after its steps ('eager' once a compiled or Triton step fell
    back), as the CUDA step of a bf16 layer output would choose it; 'eager' with offload."""
    from revnet_zero.conversion.bdia import BDIALayer
    layer = next(m for m in model.modules() if isinstance(m, BDIALayer))
    if layer.offload is not None:
        return "eager"
    probe = torch.empty(1, dtype=torch.bfloat16, device="cuda")
    return layer.grid_step.kind(probe) + (f" (failed: {layer.grid_step.failed})" if layer.grid_step.failed else "")


def _host_stats() -> dict:
    """Pinned host memory held by torch's host allocator (its peak so far, GiB) and the seconds spent
    pinning new blocks, where this torch reports them."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    try:
        s = stats() if stats else {}
    except Exception:  # noqa: BLE001 - statistics, not the measurement
        s = {}
    peak, alloc_us = s.get("allocated_bytes.peak"), s.get("host_alloc_time.total")
    return {"host_peak_gib": None if peak is None else peak / GIB,
            "host_alloc_s": None if alloc_us is None else alloc_us / 1e6}


def write(stem: str, rows: list[dict], env: dict, a) -> None:
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    ok = {(r["mode"], r["seq"], r["layers"]): r for r in rows if r["status"] == "ok"}
    cap = f" (PyTorch capped at {env['memory_cap_gib']} GiB)" if env.get("memory_cap_gib") else ""
    lines = [f"# Converted Llama ({a.shape}) fine-tuning: ordinary vs HF checkpointing vs BDIA", "",
             f"GPU {env['gpu']}{cap}, torch {env['torch']}, commit {env['commit']}, {env['date']}; bf16 autocast, "
             f"batch 1, fused head+loss in every mode, BDIA gamma0 = {a.gamma0}, BDIA MLP "
             f"{f'tiles of {a.mlp_chunk} positions' if a.mlp_chunk else 'untiled'}"
             f"{', offload (grid tensors and kept bits in pinned host memory)' if a.offload else ''}"
             f", grid step {'eager' if a.offload else a.grid_step}. Step: median of 5 up to 32k "
             "tokens, of 2 below 128k, one step from 128k (every step's time is in the JSON)" + (" (after a warm-up step of the same length)." if a.long_warm_same
                                             else " (after a warm-up step of 8192 tokens).")
             + (f" {a.resident_layers} layers' weights on the GPU, {a.layers} of them run." if a.resident_layers
                else ""), "",
             "| mode | layers | seq | step s | tokens/s | vs hf_ac | peak GiB | static GiB | pinned host GiB | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ac = ok.get(("hf_ac", r["seq"], r["layers"]))
        vs = f"{ac['step_s'] / r['step_s']:.2f}x" if ac and r.get("step_s") else "-"
        fmt = lambda v, s=".2f": "-" if v is None else f"{v:{s}}"  # noqa: E731
        lines.append(f"| {r['mode']} | {r['layers']} | {r['seq']} | {fmt(r.get('step_s'), '.3f')} | "
                     f"{fmt(r.get('tokens_per_s'), '.0f')} | {vs} | {fmt(r.get('peak_gib'))} | "
                     f"{fmt(r.get('static_gib'))} | {fmt(r.get('host_peak_gib'))} | {r['status']} {r.get('error') or ''} |")
    depths = sorted({r["layers"] for r in rows if r["seq"] == a.slope_seq})
    if len(depths) >= 2:
        lines += ["", "Peak growth per layer per token (slope of peak - static over depth; it includes the extra "
                  "layers' parameter gradients when the weights train, and is not the kept activation memory, "
                  f"which conversion_memory.py kept measures) at {a.slope_seq} tokens:", ""]
        for mode in a.modes.split(","):
            lo, hi = ok.get((mode, a.slope_seq, depths[0])), ok.get((mode, a.slope_seq, depths[-1]))
            if lo and hi:
                per = ((hi["peak_gib"] - hi["static_gib"]) - (lo["peak_gib"] - lo["static_gib"])) * GIB
                per /= (depths[-1] - depths[0]) * a.slope_seq
                lines.append(f"- {mode}: {per:.0f} B per layer per token")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")




def kept_per_layer(shape: str, mode: str, lengths=(128, 256), depths=(1, 2), gamma0: float = 0.125) -> float:
    """Bytes per layer per token a training forward keeps for backward, measured on CPU: live tensor
    bytes once the bf16-autocast forward has returned (``memory_breakdown.LiveTensors``; autocast's
    weight-cast cache is gone by then), differenced over two depths and two lengths, so fixed and
    per-layer-constant bytes (e.g. bf16 weight copies the graph keeps) cancel."""
    from .memory_breakdown import LiveTensors
    live = {}
    for layers in depths:
        for seq in lengths:
            model = build(shape, layers, seq, mode, gamma0, torch.device("cpu"))
            ids = random_ids(model.lm.config.vocab_size, 1, seq, torch.device("cpu"))
            tracer = LiveTensors()
            with tracer:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(ids)
                live[layers, seq] = tracer.current
            del loss, model
    (d0, d1), (s0, s1) = depths, lengths
    return (live[d1, s1] - live[d1, s0] - live[d0, s1] + live[d0, s0]) / ((d1 - d0) * (s1 - s0))


def main_kept(argv=None) -> None:
    """``python -m benchmarks.conversion_memory kept --shape 1b``: the kept-bytes table (CPU)."""
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    env = environment(torch.device("cpu"))
    rows = {mode: kept_per_layer(a.shape, mode) for mode in ("ordinary", "hf_ac", "bdia")}
    d = SHAPES[a.shape]["hidden_size"]
    lines = [f"# Kept bytes per layer per token, converted Llama ({a.shape}, d={d})", "",
             f"Measured on CPU (torch {env['torch']}, commit {env['commit']}, {env['date']}): live tensor bytes "
             "after a bf16-autocast training forward (float32 weights), differenced over 1 vs 2 layers and 128 vs "
             "256 tokens: what each layer holds until backward, per token. BDIA gamma0 = 1/8 (3 bits per "
             "element).", "", "| mode | bytes / layer / token | vs hf_ac |", "|---|---|---|"]
    for mode, b in rows.items():
        lines.append(f"| {mode} | {b:,.0f} | {b / rows['hf_ac']:.3f} |")
    _write_cpu_table(a.out, f"conversion_kept_{a.shape}_cpu_{env['date']}.md", lines)


def _write_cpu_table(out: str, name: str, lines: list[str]) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main_counts(argv=None) -> None:
    """``python -m benchmarks.conversion_memory counts --shape 1b``: FLOPs and elementwise bytes per layer
    per token of one training step, Hugging Face checkpointing vs BDIA, counted on CPU
    (``recompute_flops.Counts``, fitted over 1-2 layers and two lengths)."""
    from . import recompute_flops as rf
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--lengths", default="512,1024")
    p.add_argument("--gamma0", type=float, default=0.125)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    env = environment(torch.device("cpu"))
    lengths, depths = tuple(int(x) for x in a.lengths.split(",")), (1, 2)
    fits, ops = {}, {}
    for mode in ("hf_ac", "bdia"):
        c = {}
        for layers in depths:
            for seq in lengths:
                model = build(a.shape, layers, seq, mode, a.gamma0, torch.device("cpu"))
                ids = random_ids(model.lm.config.vocab_size, 1, seq, torch.device("cpu"))
                counts = rf.step_counts(model, ids)
                c[layers, seq] = {"flops": sum(counts.flops.values()), "other_bytes": sum(counts.other_bytes.values()),
                                  **{f"op:{k}": v for k, v in counts.other_bytes.items()}}
                del model
        fits[mode] = {"flops": rf.fit(c, depths, lengths, "flops", "quad"),
                      "other_bytes": rf.fit(c, depths, lengths, "other_bytes", "const")}
        names = {k for v in c.values() for k in v if k.startswith("op:")}
        for v in c.values():
            for k in names:
                v.setdefault(k, 0)
        ops[mode] = {k[3:]: rf.fit(c, depths, lengths, k, "const")["lin"] for k in names}
    d = SHAPES[a.shape]["hidden_size"]
    h, b = fits["hf_ac"], fits["bdia"]
    lines = [f"# Work per layer per token of one training step, converted Llama ({a.shape}, d={d}): HF checkpointing vs BDIA",
             "", f"Counted on CPU (torch {env['torch']}, commit {env['commit']}, {env['date']}): FLOPs "
             "(`torch.utils.flop_counter`, matmuls and attention) and the bytes every other op reads and writes, "
             f"bf16 autocast, float32 weights, BDIA gamma0 = {a.gamma0}; fitted over 1 and 2 layers and {lengths} "
             "tokens (the per-layer linear part: per token, independent of the length). "
             f"`python -m benchmarks.conversion_memory counts --shape {a.shape}`.", "",
             "| | hf_ac | bdia | bdia - hf_ac |", "|---|---|---|---|",
             f"| matmul MFLOP / layer / token | {h['flops']['lin'] / 1e6:.1f} | {b['flops']['lin'] / 1e6:.1f} | "
             f"{(b['flops']['lin'] - h['flops']['lin']) / 1e6:+.1f} |",
             f"| elementwise KiB / layer / token | {h['other_bytes']['lin'] / 1024:.0f} | "
             f"{b['other_bytes']['lin'] / 1024:.0f} | {(b['other_bytes']['lin'] - h['other_bytes']['lin']) / 1024:+.0f} |",
             "", "Elementwise ops that differ most (KiB / layer / token):", "", "| op | hf_ac | bdia |", "|---|---|---|"]
    names = sorted(set(ops["hf_ac"]) | set(ops["bdia"]), key=lambda k: -(ops["bdia"].get(k, 0) - ops["hf_ac"].get(k, 0)))
    for k in names[:15]:
        lines.append(f"| {k} | {ops['hf_ac'].get(k, 0) / 1024:.1f} | {ops['bdia'].get(k, 0) / 1024:.1f} |")
    _write_cpu_table(a.out, f"conversion_counts_{a.shape}_cpu_{env['date']}.md", lines)


def main_profile(argv=None) -> None:
    """``python -m benchmarks.conversion_memory profile --shape 1b --seq 8192``: where one step's GPU time
    goes, per mode (torch.profiler; one warm-up step, one profiled)."""
    from revnet_zero.benchmarks.measure import train_step

    from .profile_step import report
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--modes", default="hf_ac,bdia")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--gamma0", type=float, default=0.125)
    p.add_argument("--grid-step", default="auto", choices=("auto", "compiled", "eager", "triton"))
    p.add_argument("--eager-grid", action="store_true", help="--grid-step eager")
    p.add_argument("--sdpa", default="cudnn")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    dev = torch.device("cuda")
    if a.eager_grid:
        a.grid_step = "eager"
    print(environment(dev))
    for mode in a.modes.split(","):
        model = build(a.shape, a.layers, a.seq, mode, a.gamma0, dev, grid_step=a.grid_step)
        ids = random_ids(model.lm.config.vocab_size, 1, a.seq, dev)
        with sdpa_context(a.sdpa):
            report(f"{mode} ({a.shape}, {a.layers} layers, seq {a.seq}, grid step {a.grid_step})",
                   functools.partial(train_step, model, ids, torch.bfloat16), a.top)
        del model
        free_memory(dev)


if __name__ == "__main__":
    if sys.argv[1:2] == ["profile"]:
        main_profile(sys.argv[2:])
    elif sys.argv[1:2] == ["kept"]:
        main_kept(sys.argv[2:])
    elif sys.argv[1:2] == ["counts"]:
        main_counts(sys.argv[2:])
    else:
        main()
