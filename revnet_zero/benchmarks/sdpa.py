"""SDPA back ends: force one, find which one a module actually runs, and time them against each other."""
from __future__ import annotations

import contextlib
import statistics

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}

# aten op -> back-end name; any other SDPA path decomposes into plain ops ('math').
_OP_BACKEND = {"_scaled_dot_product_flash_attention_for_cpu": "cpu_flash",
               "_scaled_dot_product_flash_attention": "flash",
               "_scaled_dot_product_cudnn_attention": "cudnn",
               "_scaled_dot_product_efficient_attention": "efficient",
               "_scaled_dot_product_fused_attention_overrideable": "overrideable"}


def sdpa_context(backend: str | None, fallbacks: bool = False):
    """Force SDPA to ``backend`` (None: PyTorch's own choice). ``fallbacks``: also allow efficient
    and math after it, in that order of priority (for fp32 peers, which flash and cuDNN refuse);
    the back end that actually ran is then found with ``probe_backend`` and recorded."""
    if backend is None:
        return contextlib.nullcontext()
    if backend not in BACKENDS:
        raise ValueError(f"unknown SDPA back end {backend!r}; expected one of {sorted(BACKENDS)}")
    chosen = [BACKENDS[backend]]
    if fallbacks:
        chosen += [b for b in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b not in chosen]
        return sdpa_kernel(chosen, set_priority=True)
    return sdpa_kernel(chosen)


class _SdpaRecorder(TorchDispatchMode):
    """Records which fused SDPA kernels run, and whether any softmax does (the math path)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self.softmax = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _OP_BACKEND and _OP_BACKEND[name] not in self.seen:
            self.seen.append(_OP_BACKEND[name])
        self.softmax |= "softmax" in name
        return func(*args, **(kwargs or {}))


def probe_backend(attn: nn.Module, x: Tensor, amp_dtype: torch.dtype | None) -> str:
    """The SDPA back end ``attn(x)`` runs in training (grad on), e.g. ``'flash'``; ``'math'`` if no
    fused kernel ran; ``'none'`` if the module runs no attention at all."""
    x = x.detach().requires_grad_()
    rec = _SdpaRecorder()
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        with rec:
            attn(x)
    if rec.seen:
        return "+".join(rec.seen)
    return "math" if rec.softmax else "none"


# ---------------------------------------------------------------- micro-benchmark

def attention_flops(seq_len: int, batch: int, heads: int, head_dim: int, causal: bool) -> tuple[float, float]:
    """Forward and backward FLOPs of exact attention (FlashAttention's accounting: 4·B·H·S²·D forward,
    halved when causal; backward 2.5x forward)."""
    fwd = 4.0 * batch * heads * seq_len * seq_len * head_dim / (2 if causal else 1)
    return fwd, 2.5 * fwd


def _cuda_time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, by CUDA events, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def time_sdpa(backend: str, seq_len: int, heads: int = 16, head_dim: int = 64, batch: int = 1,
              dtype: torch.dtype = torch.bfloat16, causal: bool = True, repeats: int = 3,
              device: str | torch.device = "cuda") -> dict:
    """Forward and backward seconds and TFLOP/s of one SDPA back end. Errors (a back end that
    refuses the shape, out of memory) come back in ``'error'``."""
    row = {"backend": backend, "seq_len": seq_len, "heads": heads, "head_dim": head_dim, "batch": batch,
           "dtype": str(dtype).replace("torch.", ""), "causal": causal}
    gen = torch.Generator(device=device).manual_seed(seq_len)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype, generator=gen)
               .requires_grad_() for _ in range(3))
    dout = torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype, generator=gen)

    def fwd():  # the training forward (grad on: kernels that save logsumexp for backward do so)
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def fwd_bwd():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.autograd.grad(out, (q, k, v), dout)

    try:
        with sdpa_kernel([BACKENDS[backend]]):
            t_fwd = _cuda_time(fwd, repeats)
            t_both = _cuda_time(fwd_bwd, repeats)
    except RuntimeError as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        return row
    f_fwd, f_bwd = attention_flops(seq_len, batch, heads, head_dim, causal)
    t_bwd = max(t_both - t_fwd, 1e-9)
    row.update(fwd_s=t_fwd, bwd_s=t_bwd, fwd_tflops=f_fwd / t_fwd / 1e12, bwd_tflops=f_bwd / t_bwd / 1e12)
    return row


def fastest_backend(rows: list[dict]) -> str | None:
    """Of the back ends that ran at the most lengths, the one with the least forward + backward time
    summed over the lengths they all ran."""
    runs: dict[str, dict[int, float]] = {}
    for r in rows:
        if "error" not in r:
            runs.setdefault(r["backend"], {})[r["seq_len"]] = r["fwd_s"] + r["bwd_s"]
    if not runs:
        return None
    most = max(len(d) for d in runs.values())
    runs = {b: d for b, d in runs.items() if len(d) == most}
    common = set.intersection(*(set(d) for d in runs.values()))
    return min(runs, key=lambda b: sum(runs[b][s] for s in common))
