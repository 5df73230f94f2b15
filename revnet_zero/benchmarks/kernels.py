"""The Triton kernels against their references, and end to end with them on and off.

    python -m revnet_zero.benchmarks.kernels --commit C --out $OUT                 # everything, one H200
    python -m revnet_zero.benchmarks.kernels --sections micro --out $OUT           # kernels only
    python -m revnet_zero.benchmarks.kernels --tiny --device cpu --out /tmp/k      # CPU smoke: references only

Sections:
  micro    each op (revnet_zero.kernels, Liger-Kernel's norm and rope) against its reference: the median
           time of ``--repeats`` calls after two warm-up calls, and the op's minimal memory traffic (every
           input read once, every output written once) over that time, as bytes/s and as a fraction of
           ``--hbm-tbps`` (4.8 TB/s: an H200's HBM3e). On a CPU only the references run.
  convert  a converted Llama-1B (d 2048, 16 layers, random weights, nothing downloaded) against Hugging
           Face's gradient checkpointing, bf16 autocast, fused head + loss, batch 1: BDIA with the
           compiled grid step (the default, kernels off) and with the Triton one (kernels on).
  model_s  model S (revnet_zero.models preset 'S'): modes standard / full_ac / revnet_zero, its
           attention and FFN modules on the torch ops (kernels off) and on Liger-Kernel's RMSNorm and
           rotary (kernels on).
End-to-end steps: the median of 5 up to 32k tokens, of 2 below 128k, one from 128k; warmed up by one step
at the measured length below 128k and at 8192 tokens from 128k. A length that runs out of memory is
recorded as 'oom'. Results: ``<out>/kernels_<gpu>_<date>.json`` and ``.md``, written after every row.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from .measure import environment, free_memory, gpu_slug, measure_step, random_ids, sync
from .sdpa import sdpa_context

GIB = 2 ** 30
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256, rope_theta=500000.0)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=300, rope_theta=10000.0)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` synchronised calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- micro

def _kernels_run(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import revnet_zero.kernels  # noqa: F401
    except ImportError:
        return False
    return True


def grid_cases(device, tiny: bool):
    """(name, bytes, {impl: fn}) for the BDIA update + grid step, forward and backward, at 8k/32k/128k
    tokens of Llama-1B (bf16 layer outputs, gamma0 = 1/8)."""
    from revnet_zero.conversion import grid
    m, D = 3, (64 if tiny else 2048)
    for S in ((64,) if tiny else (8192, 32768, 131072)):
        g = torch.Generator(device=device).manual_seed(0)
        y = torch.randn(1, S, D, generator=g, device=device, dtype=torch.bfloat16)
        x = torch.randn(1, S, D, generator=g, device=device, dtype=torch.bfloat16)
        X = torch.randint(-2 ** 40, 2 ** 40, (1, S, D), generator=g, device=device)
        signs = grid.Signs(torch.tensor([-1], device=device), -1)
        n = y.numel()
        # update_forward: y, x, X read; X_next written; packed bits; from_grid reads X_next, writes bf16
        fwd_bytes = n * (2 + 2 + 8 + 8 + m / 8 + 8 + 2)
        bwd_bytes = n * (2 + 2 + 8 + m / 8 + 8)        # y, x, X_next, packed read; X_prev written
        steps = {"eager": None}
        if device.type == "cuda":   # where the compiled step runs (GridStep's devices)
            steps["compiled"] = grid.GridStep("compiled")
        if _kernels_run(device):
            steps["triton"] = grid.GridStep("triton")
        packed = grid.update_forward(y, x, X.clone(), signs, m)[1]
        yield (f"grid update_forward S={S}", fwd_bytes,
               {k: (lambda s=s: grid.update_forward(y, x, X, signs, m, step=s)) for k, s in steps.items()})
        yield (f"grid update_backward S={S}", bwd_bytes,
               {k: (lambda s=s: grid.update_backward(y, x, X, packed, signs, m, step=s)) for k, s in steps.items()})
        if _kernels_run(device):
            from revnet_zero import kernels as K
            yield (f"bdia_grid_step kernel alone S={S}", n * (2 + 2 + 8 + 8 + m / 8),
                   {"triton": lambda: K.bdia_grid_step(y, x, X, signs.dev, m)})


def attention_cases(device, tiny: bool):
    """Causal linear attention, [1, 16, S, 64] bf16 feature maps and values: forward, and forward +
    backward, against the S x S masked reference where that fits (S <= 8192)."""
    H, m = (2, 16) if tiny else (16, 64)
    for S in ((64,) if tiny else (4096, 8192, 65536)):
        g = torch.Generator(device=device).manual_seed(0)
        q, k = (torch.rand(1, H, S, m, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(1, H, S, m, generator=g, device=device, dtype=torch.bfloat16)
        do = torch.randn_like(v)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        fwd, bwd = {}, {}
        if _kernels_run(device):
            from revnet_zero import kernels as K
            fwd["triton"] = lambda: K.causal_linear_attention(q, k, v, 64)
            bwd["triton"] = lambda: torch.autograd.grad(K.causal_linear_attention(qg, kg, vg, 64), (qg, kg, vg), do)
        if S <= 8192:
            fwd["naive S x S"] = lambda: _naive(q, k, v)
            bwd["naive S x S"] = lambda: torch.autograd.grad(_naive(qg, kg, vg), (qg, kg, vg), do)
        one = q.numel() * 2
        yield f"linear attention forward S={S}", 4 * one, fwd
        yield f"linear attention forward+backward S={S}", 4 * one + 7 * one, bwd


def _naive(q, k, v):
    scores = (q.float() @ k.float().transpose(-1, -2)).tril()
    return (scores @ v.float()).to(v.dtype)


def affine_cases(device, tiny: bool):
    """The affine coupling's rebuild + vjp at 8k tokens of d 2048: float32 stream, bf16 h."""
    from revnet_zero import AffineCoupling
    S, D = (64, 64) if tiny else (8192, 2048)
    g = torch.Generator(device=device).manual_seed(0)
    y = torch.randn(1, S, D, generator=g, device=device)
    h = torch.randn(1, S, 2 * D, generator=g, device=device, dtype=torch.bfloat16)
    dy = torch.randn(1, S, D, generator=g, device=device)
    c = AffineCoupling(scale_init=0.1)
    impls = {"eager": lambda: c.separate_vjp(y, h, dy)}
    if _kernels_run(device):
        from revnet_zero import kernels as K
        impls["triton"] = lambda: K.affine_separate_vjp(y, h, dy, 0.1)
    n = y.numel()
    yield f"affine separate_vjp S={S}", n * (4 + 4 + 4 + 4 + 4 + 8), impls   # y, h, dy in; x, dx, dh out


def norm_rope_cases(device, tiny: bool):
    """RMSNorm (float32 stream -> bf16) and RoPE of q [1, 32, S, 64] and k [1, 8, S, 64] (bf16), forward
    and backward: the torch ops against Liger-Kernel's."""
    from revnet_zero.layers.rope import norm_rope, rope_cos_sin
    S, D, H, Hkv, hd = (64, 64, 4, 2, 16) if tiny else (8192, 2048, 32, 8, 64)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, S, D, generator=g, device=device, requires_grad=True)
    w = torch.ones(D, device=device, requires_grad=True)
    q0 = torch.randn(1, S, H, hd, generator=g, device=device, dtype=torch.bfloat16)
    k0 = torch.randn(1, S, Hkv, hd, generator=g, device=device, dtype=torch.bfloat16)
    cos, sin = rope_cos_sin(0, S, hd, 500000.0, device)
    kinds = ["torch"] + (["liger"] if device.type == "cuda" and _has("liger_kernel") else [])
    norm_impls, rope_impls = {}, {}
    for kind in kinds:
        norm, rope = norm_rope(kind)
        norm_impls[kind] = lambda norm=norm: norm(x, w, 1e-5, torch.bfloat16).float().sum().backward()

        def rope_step(rope=rope):
            q, k = (t.clone().requires_grad_() for t in (q0, k0))
            qr, kr = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            (qr.float().sum() + kr.float().sum()).backward()
        rope_impls[kind] = rope_step
    n = x.numel()
    yield f"rms_norm fwd+bwd S={S}", n * (4 + 2 + 2 + 4), norm_impls   # x, out; dout, dx (float32 stats aside)
    qk = q0.numel() + k0.numel()
    yield f"rope q+k fwd+bwd S={S}", qk * 2 * 4, rope_impls   # q, k in and out; their gradients in and out


def _has(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def micro(device, a, emit) -> None:
    for cases in (grid_cases, attention_cases, affine_cases, norm_rope_cases):
        for name, nbytes, impls in cases(device, a.tiny):
            for impl, fn in impls.items():
                row = {"section": "micro", "op": name, "impl": impl, "bytes": nbytes}
                try:
                    s = timed(fn, a.repeats, device)
                    row.update(status="ok", time_s=s, bytes_per_s=nbytes / s,
                               hbm_fraction=nbytes / s / (a.hbm_tbps * 1e12))
                except Exception as e:  # noqa: BLE001 - recorded in the row
                    row.update(status="error", error=f"{type(e).__name__}: {e}"[:300])
                emit(row)
            free_memory(device)


# ---------------------------------------------------------------- end to end

class _LossOf(nn.Module):
    """``ids`` -> the fused head + cross-entropy loss on a causal LM's last hidden state."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        from revnet_zero.ops.loss import fused_linear_cross_entropy
        h = self.lm.model(input_ids=ids).last_hidden_state
        targets = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), -100)], dim=1)
        return fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm.lm_head.weight, targets.reshape(-1))


def build_llama(mode: str, grid_step: str, seq: int, device, tiny: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from revnet_zero import convert_to_reversible
    cfg = LlamaConfig(**(TINY_LLAMA if tiny else LLAMA_1B), num_hidden_layers=2 if tiny else 16,
                      max_position_embeddings=max(seq, 8192), attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    if mode == "hf_ac":
        if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.24's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = convert_to_reversible(model, gamma0=0.125, inplace=True, verbose=False, grid_step=grid_step)
    return _LossOf(model.train())


def _repeats(seq: int, tiny: bool) -> int:
    return 1 if tiny else 5 if seq <= 32768 else 2 if seq < 131072 else 1


def convert(device, a, emit) -> None:
    runs = [("hf_ac", None), ("bdia", "auto")] + ([("bdia", "triton")] if _kernels_run(device) else [])
    for seq in a.convert_lengths:
        for mode, step in runs:
            model = build_llama(mode, step, seq, device, a.tiny)
            ids = random_ids(model.lm.config.vocab_size, 1, seq, device)
            warm = ids if seq < 131072 else random_ids(model.lm.config.vocab_size, 1, 8192, device, seed=1)
            with sdpa_context(a.sdpa if device.type == "cuda" else None):
                r = measure_step(model, ids, torch.bfloat16, _repeats(seq, a.tiny), warm)
            emit({"section": "convert", "mode": mode, "grid_step": step, "kernels": step == "triton",
                  "seq": seq, "status": r.status, "step_s": r.step_s, "step_times_s": r.times,
                  "tokens_per_s": seq / r.step_s if r.step_s else None, "peak_gib": r.peak_gib, "error": r.error})
            del model
            free_memory(device)


def model_s(device, a, emit) -> None:
    from .modes import apply_mode
    from .runner import build_model
    kernels = ["torch"] + (["liger"] if device.type == "cuda" and _has("liger_kernel") else [])
    for seq in a.model_lengths:
        model = build_model("tiny" if a.tiny else "S", None, seq, device)
        ids = random_ids(model.config.vocab_size, 1, seq, device)
        warm = ids if seq < 131072 else random_ids(model.config.vocab_size, 1, 8192, device, seed=1)
        for kind in kernels:
            for m in model.modules():
                if hasattr(m, "kernels"):
                    m.kernels = kind
            for mode in a.model_modes:
                with apply_mode(model, mode), sdpa_context(a.sdpa if device.type == "cuda" else None):
                    r = measure_step(model, ids, torch.bfloat16, _repeats(seq, a.tiny), warm)
                emit({"section": "model_s", "mode": mode, "kernels": kind, "seq": seq, "status": r.status,
                      "step_s": r.step_s, "step_times_s": r.times,
                      "tokens_per_s": seq / r.step_s if r.step_s else None, "peak_gib": r.peak_gib, "error": r.error})
                free_memory(device)
        del model
        free_memory(device)


# ---------------------------------------------------------------- report

def markdown(rows: list[dict], env: dict, a) -> str:
    lines = [f"# Triton kernels against their references, and end to end ({env['gpu']})", "",
             f"torch {env['torch']}, triton {env.get('triton')}, liger-kernel {env.get('liger_kernel')}, "
             f"commit {env['commit']}, {env['date']}. "
             f"`python -m revnet_zero.benchmarks.kernels {' '.join(a.argv)}`", "",
             f"Micro: median of {a.repeats} calls after two warm-up calls; bytes are the op's minimal traffic "
             f"(each input read once, each output written once); HBM fraction against {a.hbm_tbps} TB/s.", "",
             "| op | impl | time ms | GB/s | HBM fraction | status |", "|---|---|---|---|---|---|"]
    fmt = lambda v, s: "-" if v is None else f"{v:{s}}"  # noqa: E731
    for r in (r for r in rows if r["section"] == "micro"):
        lines.append(f"| {r['op']} | {r['impl']} | {fmt(r.get('time_s') and r['time_s'] * 1e3, '.3f')} | "
                     f"{fmt(r.get('bytes_per_s') and r['bytes_per_s'] / 1e9, '.0f')} | "
                     f"{fmt(r.get('hbm_fraction'), '.2f')} | {r['status']} {r.get('error') or ''} |")
    for section, key, base in (("convert", "grid_step", ("hf_ac", None)), ("model_s", "kernels", None)):
        sel = [r for r in rows if r["section"] == section]
        if not sel:
            continue
        lines += ["", f"## {section}", "", f"| mode | {key} | seq | step s | tokens/s | vs base | peak GiB | status |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sel:
            ref = next((b for b in sel if b["seq"] == r["seq"] and b["status"] == "ok" and (
                (b["mode"], b.get("grid_step")) == base if base else
                (b["mode"] == "standard" and b["kernels"] == "torch"))), None)
            vs = f"{ref['step_s'] / r['step_s']:.3f}x" if ref and r.get("step_s") else "-"
            lines.append(f"| {r['mode']} | {r.get(key)} | {r['seq']} | {fmt(r.get('step_s'), '.3f')} | "
                         f"{fmt(r.get('tokens_per_s'), '.0f')} | {vs} | {fmt(r.get('peak_gib'), '.2f')} | "
                         f"{r['status']} {r.get('error') or ''} |")
    lines += ["", "vs base: convert against hf_ac, model_s against standard on the torch ops, same length."]
    if env.get("liger_kernel") is None:
        lines.append("Liger-Kernel is not installed here: no 'liger' rows (pip install liger-kernel).")
    if env.get("triton") is None or env["gpu"] == "cpu":
        lines.append("No Triton kernel ran (Triton missing or no GPU): only the references' rows.")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    import sys
    p = argparse.ArgumentParser(prog="python -m revnet_zero.benchmarks.kernels", description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="micro,convert,model_s")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and lengths (the CPU smoke test)")
    p.add_argument("--repeats", type=int, default=20, help="micro: timed calls per op")
    p.add_argument("--hbm-tbps", type=float, default=4.8, help="HBM bandwidth for the fraction (H200: 4.8)")
    p.add_argument("--convert-lengths", type=_ints, default=[8192, 32768, 131072])
    p.add_argument("--model-lengths", type=_ints, default=[8192, 32768, 65536, 131072, 262144])
    p.add_argument("--model-modes", default="standard,full_ac,revnet_zero")
    p.add_argument("--sdpa", default="cudnn")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    a.argv = sys.argv[1:] if argv is None else list(argv)
    a.model_modes = [m for m in a.model_modes.split(",") if m]
    sections = [s for s in a.sections.split(",") if s]
    unknown = set(sections) - {"micro", "convert", "model_s"}
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from micro, convert, model_s")
    device = torch.device(a.device)
    env = environment(device, a.commit)
    env["triton"] = _version("triton")
    env["liger_kernel"] = _version("liger_kernel")
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"kernels_{gpu_slug(env['gpu'])}_{env['date']}")
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append({**env, **row})
        print(json.dumps(row), flush=True)
        with open(stem + ".json", "w") as f:
            json.dump(rows, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown(rows, env, a))

    for name in sections:
        {"micro": micro, "convert": convert, "model_s": model_s}[name](device, a, emit)
    return 0 if rows and all(r["status"] in ("ok", "oom") for r in rows) else 1


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
