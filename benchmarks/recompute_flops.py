"""What each mode's training step computes, counted on the CPU: FLOPs (``torch.utils.flop_counter``) and
the bytes that the other ops (elementwise, reductions, copies) read and write.

Counts, not timings: they do not depend on the machine, so the CPU gives the figures a GPU step runs
(up to kernel choice). Per layer and per token they are fitted over two depths and two lengths
(``L·(lin·S + quad·S²) + head·S``), which separates the blocks from the head and loss and the attention
(quadratic in S) from the rest, and are then evaluated at the benchmark's length and depth (``fit``
has the exact forms: FLOPs with an S² term, bytes with a per-layer constant for the weight casts).

The question it answers: at 256k tokens, full activation checkpointing's step is faster than the
reversible one by ~0.5% (``modes_..._2026-11-23.md``). Both recompute the blocks once, but
``torch.utils.checkpoint`` stops a block's recompute as soon as the last tensor its backward saved is
rebuilt (its early stop), so it never runs a block's last matmul; a reversible backward must, since it
subtracts the block's output to invert it. ``full_ac:no_early_stop`` turns that stop off.

    python -m benchmarks.recompute_flops --config S --at 262144 --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from revnet_zero.benchmarks.measure import environment
from revnet_zero.benchmarks.modes import apply_mode
from revnet_zero.benchmarks.runner import build_model

aten = torch.ops.aten
MODES = ("standard", "full_ac", "full_ac:no_early_stop", "revnet_zero", "revnet_zero:store_attention")


def _causal(flops: int, is_causal: bool) -> int:
    return flops // 2 if is_causal else flops   # torch's formulas count the full S x S product


# torch counts the CUDA SDPA kernels; the CPU ones (the same arithmetic) are registered here.
if aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
    def _cpu_sdpa(query, key, value, dropout_p=0.0, is_causal=False, *args, out_val=None, **kwargs) -> int:
        return _causal(sdpa_flop_count(query.shape, key.shape, value.shape), is_causal)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
    def _cpu_sdpa_backward(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False,
                           *args, out_val=None, **kwargs) -> int:
        return _causal(sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape), is_causal)


_VIEWS = {"view", "_unsafe_view", "detach", "t", "transpose", "expand", "slice", "select", "permute", "alias",
          "unsqueeze", "squeeze", "as_strided", "split", "split_with_sizes", "unbind", "chunk", "narrow",
          "lift_fresh", "_reshape_alias", "reshape"}


class Counts(TorchDispatchMode):
    """FLOPs of every op torch has a formula for (``torch.utils.flop_counter``'s registry: matmuls and
    attention), and the bytes read and written by every other op (elementwise, reductions, copies: the
    memory-bound part of a step); views move nothing and are skipped. A plain dispatch mode:
    ``FlopCounterMode`` also tracks modules with gradient hooks, which ``autograd.grad`` inside a
    backward (the reversible engine's) does not allow."""

    def __init__(self):
        super().__init__()
        self.flops, self.other_bytes = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet in flop_registry:
            self.flops[packet.__name__] += flop_registry[packet](*args, **kwargs, out_val=out)
        elif packet.__name__ not in _VIEWS:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.other_bytes[packet.__name__] += sum(t.numel() * t.element_size() for t in tensors)
        return out


def step_counts(model, ids) -> Counts:
    """The counts of one training step: bf16-autocast forward (``model(ids)`` gives a loss or an output
    with ``.loss``), backward outside autocast, as the benchmark's step (``measure_step``) runs it."""
    counts = Counts()
    with counts:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids)
            loss = getattr(out, "loss", out)
        loss.backward()
    return counts


def count(config: str, layers: int, seq: int, mode: str) -> dict:
    """FLOPs and other ops' bytes of one training step of preset ``config`` in benchmark ``mode``."""
    model = build_model(config, layers, seq, torch.device("cpu"))
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    with apply_mode(model, mode):
        counts = step_counts(model, ids)
    return {"flops": sum(counts.flops.values()), "flops_by_op": dict(counts.flops),
            "other_bytes": sum(counts.other_bytes.values())}


def fit(c: dict, depths: tuple[int, int], lengths: tuple[int, int], key: str, second: str) -> dict:
    """``v(L, S) = L·(lin·S + quad·S² + const) + head·S + head_const`` from the four counts ``c[L, S][key]``,
    with ``second`` saying which of ``quad`` (FLOPs: attention) or ``const`` (bytes: a layer's weight casts,
    independent of S) the two lengths determine; the other is 0."""
    (l0, l1), (s0, s1) = depths, lengths
    per_layer = {s: (c[l1, s][key] - c[l0, s][key]) / (l1 - l0) for s in lengths}
    rest = {s: c[l0, s][key] - l0 * per_layer[s] for s in lengths}   # head, loss, embedding
    f = {"quad": 0.0, "const": 0.0, "head_const": 0.0}
    if second == "quad":     # per_layer(S) = lin·S + quad·S²; rest(S) = head·S
        f["quad"] = (per_layer[s1] / s1 - per_layer[s0] / s0) / (s1 - s0)
        f["lin"] = per_layer[s0] / s0 - f["quad"] * s0
        f["head"] = rest[s1] / s1
    else:                    # per_layer(S) = lin·S + const; rest(S) = head·S + head_const
        f["lin"] = (per_layer[s1] - per_layer[s0]) / (s1 - s0)
        f["const"] = per_layer[s0] - f["lin"] * s0
        f["head"] = (rest[s1] - rest[s0]) / (s1 - s0)
        f["head_const"] = rest[s0] - f["head"] * s0
    return f


def at(f: dict, layers: int, seq: int) -> float:
    return layers * (f["lin"] * seq + f["quad"] * seq ** 2 + f["const"]) + f["head"] * seq + f["head_const"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="S")
    p.add_argument("--depths", default="1,2")
    p.add_argument("--lengths", default="512,1024")
    p.add_argument("--at", type=int, default=262144, help="length to evaluate the fit at")
    p.add_argument("--at-layers", type=int, default=None, help="depth to evaluate at (default: the preset's)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    from revnet_zero.models import TransformerConfig
    depths = tuple(int(x) for x in a.depths.split(","))
    lengths = tuple(int(x) for x in a.lengths.split(","))
    L = a.at_layers or TransformerConfig.preset(a.config).num_layers
    env = environment(torch.device("cpu"))
    rows = []
    for mode in a.modes.split(","):
        c = {(d, s): count(a.config, d, s, mode) for d in depths for s in lengths}
        flops, other = fit(c, depths, lengths, "flops", "quad"), fit(c, depths, lengths, "other_bytes", "const")
        rows.append({"mode": mode, "counts": {f"{d}x{s}": v for (d, s), v in c.items()},
                     "flops_fit": flops, "other_bytes_fit": other,
                     "flops_at": at(flops, L, a.at), "other_bytes_at": at(other, L, a.at)})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "counts"}), flush=True)
    by = {r["mode"]: r for r in rows}
    std = by.get("standard")
    lines = [f"# FLOPs and memory-bound bytes of one training step, model {a.config}, by mode (counted on CPU)", "",
             f"torch {env['torch']}, commit {env['commit']}, {env['date']}. Counted with `torch.utils.flop_counter` "
             "(causal attention counted as half the full product) and a dispatch mode summing the bytes read and "
             "written by every op without a FLOP formula; bf16 autocast forward, backward outside it, batch 1, fused "
             f"head + loss. Fitted over depths {depths} and lengths {lengths} as `L·(lin·S + quad·S²) + head·S` "
             "(FLOPs) and `L·(lin·S + const) + head·S + head_const` (bytes; const: a layer's weight casts), evaluated at "
             f"{L} layers and {a.at} tokens. `python -m benchmarks.recompute_flops --config {a.config} --at {a.at}`.",
             "", f"| mode | TFLOP at {a.at} | vs standard | vs revnet_zero | matmul GFLOP / layer / 1k tokens "
             f"(linear part) | other ops GB at {a.at} |", "|---|---|---|---|---|---|"]
    rev = by.get("revnet_zero")
    for r in rows:
        vs_std = f"{r['flops_at'] / std['flops_at']:.4f}x" if std else "-"
        vs_rev = f"{r['flops_at'] / rev['flops_at']:.4f}x" if rev else "-"
        lines.append(f"| {r['mode']} | {r['flops_at'] / 1e12:.1f} | {vs_std} | {vs_rev} | "
                     f"{r['flops_fit']['lin'] * 1000 / 1e9:.2f} | {r['other_bytes_at'] / 1e9:.0f} |")
    if rev and "full_ac" in by:
        gap = 1 - by["full_ac"]["flops_at"] / rev["flops_at"]
        lines += ["", f"At {a.at} tokens and {L} layers full_ac's step computes {100 * gap:.2f}% fewer FLOPs than "
                  "revnet_zero's: the per-layer linear part (the matmuls) differs, the quadratic part (attention) "
                  "does not; `full_ac:no_early_stop` says whether the early stop is the whole difference. The other ops move "
                  f"{(rev['other_bytes_at'] - by['full_ac']['other_bytes_at']) / 1e9:.0f} GB more in revnet_zero's step "
                  f"({100 * (rev['other_bytes_at'] / by['full_ac']['other_bytes_at'] - 1):.1f}%)."]
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"recompute_flops_{a.config}_cpu_{env['date']}")
    with open(stem + ".json", "w") as f:
        json.dump({"env": env, "at": a.at, "layers": L, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
