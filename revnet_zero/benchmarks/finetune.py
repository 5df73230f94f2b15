"""Long-context fine-tuning side by side: what the three runners share (GPU; a tiny shape runs on CPU).

The runners (``finetune_ours``, ``finetune_hf``, ``finetune_alst``) train the same model shape
(random init, bf16 weights, batch 1), on the same random tokens (``tokens``), with the same method
('lora': r=16 adapters on q/k/v/o; 'qlora': the same on nf4 base weights; 'full': every weight, an
8-bit AdamW), and write the same row: tokens/s, step time, peak GPU memory, pinned host memory.
``--length N`` measures one length in this process; ``--search LO,HI`` finds the longest length that
trains, each probe in a fresh process (an out-of-memory error can leave the allocator fragmented).

    python -m revnet_zero.benchmarks.finetune_ours --shape llama-3.1-8b --method lora --lengths 32768,131072 \
        --memory-cap-gib 78.4 --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

GIB = 2 ** 30
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
SHAPES = {   # transformers config fields; random init, nothing downloaded
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "rope_parameters": _LLAMA3_ROPE},
    "qwen3-8b": {"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    "tiny": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256},
}
METHODS = ("lora", "qlora", "full")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class Run:
    """One measurement's settings."""

    runner: str                 # 'ours', 'hf' or 'alst'
    shape: str                  # a key of SHAPES
    method: str                 # 'lora', 'qlora' or 'full'
    length: int                 # tokens in the one sequence of the batch
    layers: int | None = None   # run this many layers (a stand-in for the full depth); None: the shape's
    steps: int = 3              # timed steps, after one warm-up step
    memory_cap_gib: float | None = None   # allocator cap standing in for a smaller GPU (78.4: an 80 GB H100)
    device: str = "cuda"
    seed: int = 0               # the tokens' seed: the same data for every runner

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {self.shape!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("length", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"layers must be None or >= 1, got {self.layers!r}")
        if self.memory_cap_gib is not None and self.memory_cap_gib <= 0:
            raise ValueError(f"memory_cap_gib must be > 0, got {self.memory_cap_gib!r}")


def model_config(run: Run):
    """The shape's transformers config (``layers`` applied), SDPA attention."""
    from transformers import AutoConfig
    fields = dict(SHAPES[run.shape])
    if run.layers is not None:
        fields["num_hidden_layers"] = run.layers
    fields["max_position_embeddings"] = max(run.length, 8192)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config._attn_implementation = "sdpa"
    config.use_cache = False
    return config


def build_model(run: Run) -> nn.Module:
    """The random-init causal LM in bf16 on ``run.device``; for 'qlora' its linear layers in nf4."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device(run.device):
        model = AutoModelForCausalLM.from_config(model_config(run), dtype=torch.bfloat16)
    if run.method == "qlora":
        quantize_nf4(model)
    if run.method in ("lora", "qlora"):
        model.requires_grad_(False)
    return model


def quantize_nf4(model: nn.Module) -> None:
    """Replace the decoder layers' ``nn.Linear`` by bitsandbytes nf4 ``Linear4bit`` (bf16 compute)."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("method 'qlora' needs bitsandbytes (pip install bitsandbytes)") from e
    for layer in model.model.layers:
        for name, lin in list(layer.named_modules()):
            if isinstance(lin, nn.Linear):
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if lin.bias is not None:
                    q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
                parent, _, leaf = name.rpartition(".")
                if lin.weight.device.type == "cpu":
                    # bitsandbytes' CPU back end would repack the weights for an inference kernel without a
                    # backward on the first eval forward (the converter's probe): CPU smoke runs only
                    q.support_avx512bf16_for_cpu = False
                setattr(layer.get_submodule(parent) if parent else layer, leaf, q.to(lin.weight.device))  # quantises


def add_lora(model: nn.Module) -> nn.Module:
    import peft
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
    return peft.get_peft_model(model, config)


def tokens(run: Run, vocab: int) -> torch.Tensor:
    """``[1, length]`` random token ids from ``run.seed``: every runner trains on the same ones."""
    g = torch.Generator().manual_seed(run.seed)
    return torch.randint(0, vocab, (1, run.length), generator=g).to(run.device)


def eight_bit_adamw():
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("method 'full' uses bitsandbytes' 8-bit AdamW (pip install bitsandbytes)") from e
    return bnb.optim.AdamW8bit


def pinned_host_gib() -> float | None:
    """Peak pinned host memory of torch's host allocator (GiB), where this torch reports it."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None or not torch.cuda.is_available():
        return None
    peak = stats().get("allocated_bytes.peak")
    return None if peak is None else peak / GIB


def measure(run: Run, step) -> dict:
    """One warm-up ``step()`` then ``run.steps`` timed ones; the row (status 'oom' / 'error' on failure)."""
    cuda = run.device.startswith("cuda")
    row = {**asdict(run), "status": "ok"}
    try:
        step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for _ in range(run.steps):
            t0 = time.perf_counter()
            losses.append(step())   # the loss as a float: a sync
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as e:
        return {**row, "status": "oom", "error": str(e).splitlines()[0][:300]}
    step_s = statistics.median(times)
    row.update(step_s=step_s, step_times_s=times, tokens_per_s=run.length / step_s, losses=losses,
               peak_gpu_gib=torch.cuda.max_memory_allocated() / GIB if cuda else None,
               pinned_host_gib=pinned_host_gib())
    return row


def environment() -> dict:
    import importlib.metadata as md
    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "trl", "deepspeed",
                 "arctic-training"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "versions": versions, "commit": os.environ.get("REVNET_COMMIT")}


def write_row(out: str, row: dict) -> None:
    """Append ``row`` (one JSON line) to ``out/finetune_<runner>.jsonl``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"finetune_{row['runner']}.jsonl"), "a") as f:
        f.write(json.dumps({**row, **environment()}) + "\n")


def parser(runner: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m revnet_zero.benchmarks.finetune_{runner}",
                                description=f"long-context fine-tuning, runner {runner!r} (see finetune.py)")
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("--method", default="lora", choices=METHODS)
    p.add_argument("--lengths", default="32768", help="comma-separated lengths, each measured in this process")
    p.add_argument("--search", default=None, help="LO,HI: the longest length in [LO, HI] that trains "
                                                  "(multiples of --granularity, each probe in a fresh process)")
    p.add_argument("--granularity", type=int, default=16384)
    p.add_argument("--layers", type=int, default=None, help="stand-in depth (default: the shape's)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--memory-cap-gib", type=float, default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="benchmarks/results")
    return p


def main(runner: str, run_one, argv=None, extra=None) -> list[dict]:
    """Parse the common flags (and ``extra(parser)``'s), then measure each length or search the longest."""
    p = parser(runner)
    if extra is not None:
        extra(p)
    a = p.parse_args(argv)
    common = dict(runner=runner, shape=a.shape, method=a.method, layers=a.layers, steps=a.steps,
                  memory_cap_gib=a.memory_cap_gib, device=a.device)
    if a.search:
        return [search(runner, a, argv if argv is not None else sys.argv[1:])]
    if a.memory_cap_gib is not None and runner != "alst":   # arctic-training's process applies its own
        total = torch.cuda.get_device_properties(0).total_memory / GIB
        torch.cuda.set_per_process_memory_fraction(a.memory_cap_gib / total)
    rows = []
    for length in (int(n) for n in a.lengths.split(",")):
        row = run_one(Run(length=length, **common), a)
        write_row(a.out, row)
        print(json.dumps({k: row.get(k) for k in ("runner", "method", "length", "status", "tokens_per_s",
                                                  "step_s", "peak_gpu_gib", "pinned_host_gib")}), flush=True)
        rows.append(row)
    return rows


def search(runner: str, a, argv: list[str]) -> dict:
    """Bisect on multiples of ``a.granularity`` in [LO, HI] for the longest length whose row is 'ok'."""
    lo, hi = (int(n) for n in a.search.split(","))
    g = a.granularity
    base = [x for x in _without(argv, "--search", "--lengths")]
    best, low, high = None, lo // g, hi // g
    while low <= high:
        mid = (low + high) // 2
        cmd = [sys.executable, "-m", f"revnet_zero.benchmarks.finetune_{runner}", *base, "--lengths", str(mid * g)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        last = [line for line in done.stdout.splitlines() if line.startswith("{")]
        ok = done.returncode == 0 and last and json.loads(last[-1])["status"] == "ok"
        print(f"search {runner}: {mid * g} tokens {'ok' if ok else 'failed'}", flush=True)
        if ok:
            best, low = mid * g, mid + 1
        else:
            high = mid - 1
    row = {"runner": runner, "shape": a.shape, "method": a.method, "search": [lo, hi], "granularity": g,
           "longest": best, "memory_cap_gib": a.memory_cap_gib, "layers": a.layers}
    write_row(a.out, row)
    print(json.dumps(row), flush=True)
    return row


def _without(argv: list[str], *flags: str) -> list[str]:
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x in flags:
            skip = True
            continue
        if any(x.startswith(f + "=") for f in flags):
            continue
        out.append(x)
    return out
