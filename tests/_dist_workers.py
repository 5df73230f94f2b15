"""Helpers for tests/test_distributed.py: a tiny model, a process launcher, and the per-rank workers.

Workers run in processes started with the ``spawn`` method, so they live in a plain module that the
children can import (not in the test module, which pytest may import under another name). Each worker
returns a dict of tensors; the launcher saves it per rank and the test process asserts on it, so a
failure reads as an ordinary pytest assertion. A worker that raises sends its traceback back instead.
"""
from __future__ import annotations

import copy

import _spawn
from helpers import rel_err, worst_rel_err  # noqa: F401 (the tests use them from here)
import torch
from torch import nn

from revnet_zero import AdditiveCoupling, ReversibleSequence

# Odd sizes on purpose: D = 10 is not a power of two (FSDP2 shards dim 0 unevenly: 5 + 5, and the
# output bias 5 -> 3 + 2), S = 3 is odd.
D_IN, D, D_OUT, DEPTH = 7, 10, 5, 6
GLOBAL_BATCH, SEQ = 8, 3
WORLD = 2


# ----------------------------------------------------------------------------------------- model
def _mlp(d: int) -> nn.Module:
    mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, d))
    # Halve the residual branch's output layer (GPT-2 style scaled init). This keeps the stack well
    # conditioned: over 100 seeds, two fp32 runs that differ only in summation order then stay
    # within 7.2e-7 of each other (with the default init the tail reached 1.6e-6, above RTOL).
    with torch.no_grad():
        mlp[3].weight.mul_(0.5)
        mlp[3].bias.mul_(0.5)
    return mlp


class TinyRevNet(nn.Module):
    """Linear in -> 6 reversible additive blocks -> Linear out. x: [B, S, D_IN] -> [B, S, D_OUT]."""

    def __init__(self, depth: int = DEPTH):
        super().__init__()
        self.inp = nn.Linear(D_IN, D)
        self.seq = ReversibleSequence([AdditiveCoupling(f=_mlp(D), g=_mlp(D)) for _ in range(depth)])
        self.out = nn.Linear(2 * D, D_OUT)

    def forward(self, x):
        y1, y2 = self.seq(self.inp(x))  # x2 defaults to x1
        return self.out(torch.cat([y1, y2], dim=-1))


def build_model(seed: int = 0) -> TinyRevNet:
    torch.manual_seed(seed)
    model = TinyRevNet()
    model.seq.set_policy("recompute")  # explicit: the reversible path is what these tests are about
    return model


def reference_of(model: TinyRevNet) -> TinyRevNet:
    """A copy that runs plain autograd (every block on the 'store' policy)."""
    ref = copy.deepcopy(model)
    ref.seq.set_policy("store")
    return ref


def make_batch(seed: int = 1, batch: int = GLOBAL_BATCH):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, SEQ, D_IN, generator=g)
    target = torch.randn(batch, SEQ, D_OUT, generator=g)
    return x, target


def loss_fn(model: nn.Module, x, target):
    return (model(x) - target).pow(2).mean()


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"parameter {name} got no gradient"
        out[name] = p.grad.detach().clone()
    return out


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def reference_grads(model: TinyRevNet, x, target) -> dict[str, torch.Tensor]:
    ref = reference_of(model)
    loss_fn(ref, x, target).backward()
    return grads_of(ref)


# -------------------------------------------------------------------------------------- launcher
def run_workers(worker_name: str, world: int = WORLD) -> list[dict]:
    """Run ``worker_name(rank, world)`` in ``world`` spawned processes; return each rank's result."""
    return _spawn.run_workers(__name__, worker_name, world)



# --------------------------------------------------------------------------------------- workers
def _local_half(rank: int, world: int, x, target):
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n], target[rank * n:(rank + 1) * n]


# find_unused_parameters=False (the default) is the strict mode: every parameter must be marked ready
# exactly once per backward. static_graph is what users switch on for reentrant checkpointing;
# gradient_as_bucket_view makes .grad a view into DDP's bucket, so autograd accumulates in place there.
DDP_CONFIGS = ({}, {"find_unused_parameters": True}, {"static_graph": True},
               {"gradient_as_bucket_view": True})


def ddp_grads_worker(rank: int, world: int) -> dict:
    """DDP under each of DDP_CONFIGS, two iterations with an SGD step between them.

    Returns, per setting, the DDP gradients of each iteration and the parameters after the first
    step, each beside the single-process reference's (plain autograd, full global batch, mean loss).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for cfg in DDP_CONFIGS:
        tag = ",".join(f"{k}={v}" for k, v in cfg.items()) or "defaults"
        model = build_model()
        ref = reference_of(model)
        ddp = DDP(model, **cfg)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        for it in range(2):
            x, target = make_batch(seed=10 + it)
            opt.zero_grad(set_to_none=True)
            ref_opt.zero_grad(set_to_none=True)
            loss_fn(ddp, *_local_half(rank, world, x, target)).backward()
            loss_fn(ref, x, target).backward()
            out[f"{tag}/it{it}"] = {"got": grads_of(model), "want": grads_of(ref)}
            opt.step()
            ref_opt.step()
            if it == 0:
                out[f"{tag}/params after 1 step"] = {"got": params_of(model), "want": params_of(ref)}
    return out


def ddp_no_sync_worker(rank: int, world: int) -> dict:
    """Each rank splits its half of the batch into 2 micro-batches (loss / 2 each); the first backward
    runs under ``no_sync()`` (local accumulation only), the second all-reduces the sum."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build_model()
    want = reference_grads(model, *make_batch())
    ddp = DDP(model)
    x, target = _local_half(rank, world, *make_batch())
    micro = 2
    xs, ts = x.chunk(micro), target.chunk(micro)
    with ddp.no_sync():
        (loss_fn(ddp, xs[0], ts[0]) / micro).backward()
    local_only = grads_of(model)
    (loss_fn(ddp, xs[1], ts[1]) / micro).backward()
    # What the first micro-batch alone gives on this rank, to show that no_sync did not all-reduce.
    ref0 = reference_of(build_model())
    (loss_fn(ref0, xs[0], ts[0]) / micro).backward()
    return {"got": grads_of(model), "want": want,
            "local_only": local_only, "local_only_want": grads_of(ref0)}


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4 / 2.5
    return fully_shard


def fsdp2_worker(rank: int, world: int) -> dict:
    """FSDP2: ``fully_shard`` on every ReversibleBlock, then on the root; CPU mesh, gloo.

    Gradients of two iterations with an SGD step between them, and the parameters after the first
    step, for reshard_after_forward True (each block's unsharded parameters are freed after its
    forward and gathered again for its backward, under the engine's saved references) and False.
    """
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = _fully_shard()
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for reshard in (True, False):
        model = build_model()
        ref = reference_of(model)
        for block in model.seq.blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        for it in range(2):
            x, target = make_batch(seed=20 + it)
            opt.zero_grad(set_to_none=True)
            ref_opt.zero_grad(set_to_none=True)
            loss_fn(model, *_local_half(rank, world, x, target)).backward()
            loss_fn(ref, x, target).backward()
            got = {}
            for name, p in model.named_parameters():
                assert p.grad is not None, f"parameter {name} got no gradient under FSDP2"
                got[name] = p.grad.full_tensor().detach().clone()  # all-gather: every rank calls it
            out[f"reshard={reshard}/it{it}"] = {"got": got, "want": grads_of(ref)}
            opt.step()
            ref_opt.step()
            if it == 0:
                # Compared after one step: a parameter that starts at 0 (LayerNorm bias) holds -lr * g
                # then, with g's relative error; after two steps it holds -lr * (g0 + g1), whose terms
                # may cancel and amplify rounding beyond what says anything about the engine.
                out[f"reshard={reshard}/params after 1 step"] = {
                    "got": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
                    "want": params_of(ref),
                }
    return out
