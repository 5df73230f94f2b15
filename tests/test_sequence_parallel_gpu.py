"""Sequence parallelism on CUDA: the ring's CUDA kernels (cuDNN and flash in bf16, memory-efficient in
float32) and the other modes, against one process (skipped without a GPU).

The ranks are processes joined by gloo on one GPU (gloo moves CUDA tensors through host memory: slow,
exact), so the merge of partial attentions runs with the CUDA kernels' logsumexps; where gloo cannot
move CUDA tensors (torch 2.11's gloo crashed on them on an H200) the multi-rank tests are skipped with
what it did, and one NCCL rank still runs every kernel call of the ring. The NCCL runs across GPUs are
the multi-GPU benchmark's (``python -m revnet_zero.benchmarks.sequence_parallel sweep --grad-check``).

Tolerances (norm-wise relative error per parameter gradient, against one process in float32): float32
1e-5 (the CPU runs measure 4e-7; the CUDA kernels reduce in other orders). bf16: the split run may be at
most twice as far from the float32 reference as one process in bf16 is (plain autograd under the same
autocast: bf16's own error), plus 1e-3.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _sp_workers as W  # noqa: E402
from helpers import worst_rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gloo_cuda():
    try:
        why = W.run("gloo_cuda_probe", 2)[0]
    except AssertionError as e:   # the probe's processes died (seen: a segfault in gloo)
        why = str(e).splitlines()[0]
    if why:
        pytest.skip(f"gloo cannot run the collectives on CUDA tensors here: {why}")


@pytest.mark.parametrize("mode,dtype,backend", [("ring", "bfloat16", "cudnn"), ("ring", "bfloat16", "flash"),
                                                ("ring", "float32", "cudnn"), ("all_to_all", "bfloat16", "cudnn"),
                                                ("all_gather", "bfloat16", "flash")])
def test_split_over_two_ranks_equals_one_process(gloo_cuda, mode, dtype, backend):
    for rank, r in enumerate(W.run("sp_cuda_worker", 2, mode=mode, dtype=dtype, backend=backend, seq=512)):
        err, name = worst_rel_err(r["grads"], r["want"]["grads"])
        floor, _ = worst_rel_err(r["base"]["grads"], r["want"]["grads"])
        bound = 1e-5 if dtype == "float32" else 2 * floor + 1e-3
        print(f"{mode} {dtype} {backend} rank {rank}: grad err {err:.3g} ({name}); one process in {dtype} "
              f"{floor:.3g}; loss {r['loss'].item():.6f} vs {r['want']['loss'].item():.6f}")
        assert err <= bound, f"rank {rank}: {name} off by {err:.3g} > {bound:.3g}"
        loss_floor = abs(r["base"]["loss"].item() - r["want"]["loss"].item())
        assert abs(r["loss"].item() - r["want"]["loss"].item()) <= (1e-5 if dtype == "float32"
                                                                    else 2 * loss_floor + 1e-3)


def test_ring_on_one_rank_runs_each_cuda_kernel():
    """World size 1 on NCCL (no exchange): the ring's forward and backward kernel calls for each backend."""
    for dtype, backend in [("bfloat16", "cudnn"), ("bfloat16", "flash"), ("float32", "cudnn")]:
        r = W.run("sp_cuda_worker", 1, pg_backend="nccl", mode="ring", dtype=dtype, backend=backend, seq=256)[0]
        err, name = worst_rel_err(r["grads"], r["want"]["grads"])
        floor, _ = worst_rel_err(r["base"]["grads"], r["want"]["grads"])
        print(f"ring on 1 rank {dtype} {backend}: grad err {err:.3g} ({name}), one process in {dtype} "
              f"{floor:.3g}")
        assert err <= (1e-5 if dtype == "float32" else 2 * floor + 1e-3), (dtype, backend, name, err)


def test_efficient_kernel_pads_its_logsumexp():
    """Why float32 ring attention needs query chunks of a multiple of 32 (distributed/ring.py): the
    memory-efficient kernel's logsumexp is padded to 32 positions, which the ring's merge cannot take."""
    q = torch.randn(1, 2, 48, 32, device="cuda")
    out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, q, q, None, True)
    print(f"efficient kernel: 48 queries -> logsumexp {tuple(lse.shape)}")
    assert lse.shape[-1] == 64
