"""Is the cuDNN attention forward as fast through ``aten._scaled_dot_product_cudnn_attention`` (what the
reversible engine calls, to get the logsumexp) as through ``F.scaled_dot_product_attention``?

    python -m benchmarks.sdpa_call_check --seq 262144 --repeats 5

B=1, 16 heads, head dim 64, bf16, causal, q/k/v in the projections' [B, S, H, hd] layout (and, for
comparison, [B, H, S, hd]-contiguous). Prints the median milliseconds per call of each way.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from revnet_zero.benchmarks.sdpa import _cuda_time

aten = torch.ops.aten


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` by CUDA events (the runner's SDPA timer)."""
    return _cuda_time(fn, repeats) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=262144)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    S, H, D = a.seq, 16, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3)]
    bshd = [t.transpose(1, 2) for t in base]
    bhsd = [t.contiguous() for t in bshd]
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} S={S}")
    for name, (q, k, v) in (("bshd", bshd), ("bhsd", bhsd)):
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

        def via_sdpa():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)

        def via_aten():
            aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)

        def via_aten_nolse():
            aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, True, False)

        for label, fn in (("F.sdpa (grad inputs)", via_sdpa), ("aten, logsumexp", via_aten),
                          ("aten, no logsumexp", via_aten_nolse)):
            print(f"{name} {label:24s} {timed(fn, a.repeats):9.2f} ms")
        # in the order the step runs them, twice, to see drift between repeated measurements
        print(f"{name} F.sdpa again            {timed(via_sdpa, a.repeats):9.2f} ms")
        print(f"{name} aten again              {timed(via_aten, a.repeats):9.2f} ms")


if __name__ == "__main__":
    main()
