"""The reversible engine under data parallelism, gradient accumulation and parameter hooks.

The engine returns parameter gradients from its autograd.Function instead of writing ``.grad`` inside
backward, so everything built on autograd's accumulation (DDP buckets, FSDP2 reduce-scatter, hooks,
accumulation over micro-batches) must see exactly one gradient per parameter per backward. Each test
compares against one plain-autograd reference (``set_policy('store')``, one process, full batch).

Multi-process tests: 2 CPU processes, gloo, spawned by ``_dist_workers.run_workers``.
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # spawned workers import it by name
import _dist_workers as W  # noqa: E402

# fp32 tolerance, norm-wise relative error ||g - g_ref|| / ||g_ref|| per parameter. The distributed
# run and the reference do the same math in a different order: the batch reduction inside each
# weight-gradient matmul is split in halves (or micro-batches) whose partial sums are added afterwards
# (DDP all-reduce, FSDP2 reduce-scatter, .grad accumulation), and the recompute rebuilds each block's
# inputs by subtraction (x2 = y2 - G(y1)), exact only up to rounding. fp32 rounds each operation by up
# to 2**-24 ~ 6e-8, and the errors compound through 6 blocks; the worst parameters are LayerNorm
# weights and biases, whose gradient is a sum over tokens with cancellation. Measured here: the fp32
# reference itself is 4e-7 from an fp64 run; the tests below see 3e-7 to 6e-7; over 100 seeds the
# worst was 7.2e-7. A real engine error (a gradient missing, doubled or taken at the wrong input) is
# O(1e-2) or more, so 1e-6 separates the two.
RTOL = 1e-6

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not in this build")


def _fsdp2_missing() -> str | None:
    try:
        W._fully_shard()
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
    except ImportError as e:
        return f"FSDP2 (fully_shard / init_device_mesh) is not in this torch build: {e}"
    return None


def assert_close_grads(got: dict, want: dict, what: str) -> None:
    err, name = W.worst_rel_err(got, want)
    assert err <= RTOL, f"{what}: relative error {err:.3g} > {RTOL} (worst parameter: {name})"


# ------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
@needs_gloo
def test_ddp_gradients_equal_single_process_reference():
    """DDP over 2 ranks (half the batch each) == plain autograd on the full batch, over two
    iterations with an SGD step in between, for each of ``W.DDP_CONFIGS`` (defaults, i.e.
    find_unused_parameters=False; find_unused_parameters=True; static_graph; gradient_as_bucket_view).

    An engine that ran a nested backward into the real parameters (the reentrant-checkpoint pattern)
    makes DDP raise "Expected to mark a variable ready only once" inside backward; the worker's
    traceback then fails this test (checked by mutating the engine). Gradients written straight
    into ``.grad`` were seen to slip past DDP on torch 2.13 (the gradients still came out averaged);
    the hook and ``torch.autograd.grad`` tests below catch that instead."""
    results = W.run_workers("ddp_grads_worker")
    for rank, res in enumerate(results):
        for key, pair in res.items():
            assert_close_grads(pair["got"], pair["want"], f"rank {rank} {key}")
    for key in results[0]:  # after the all-reduce every rank holds the same gradients
        for name, g in results[0][key]["got"].items():
            torch.testing.assert_close(results[1][key]["got"][name], g, rtol=0, atol=0)


@pytest.mark.slow
@needs_gloo
def test_ddp_no_sync_accumulation_equals_full_batch():
    """Two micro-batches per rank, the first under ``no_sync()``: the final gradients equal the
    full-batch reference; after the first one they are the local micro-batch's only."""
    for rank, res in enumerate(W.run_workers("ddp_no_sync_worker")):
        assert_close_grads(res["local_only"], res["local_only_want"], f"rank {rank} under no_sync")
        assert_close_grads(res["got"], res["want"], f"rank {rank} after the synced micro-batch")


# ----------------------------------------------------------------------------------------- FSDP2
@pytest.mark.slow
@needs_gloo
@pytest.mark.skipif(_fsdp2_missing() is not None, reason=str(_fsdp2_missing()))
def test_fsdp2_per_block_sharding_gradients_and_step_equal_reference():
    """``fully_shard`` on each ReversibleBlock and on the root (reshard_after_forward True and False):
    gathered gradients of two iterations and the parameters after the first SGD step equal the
    single-process reference."""
    results = W.run_workers("fsdp2_worker")
    for rank, res in enumerate(results):
        for key, pair in res.items():
            assert_close_grads(pair["got"], pair["want"], f"rank {rank} {key}")


# ------------------------------------------------------------------------- gradient accumulation
def test_micro_batch_accumulation_equals_full_batch():
    """4 micro-batches with loss / 4 each, one backward per micro-batch, on the reversible stack ==
    one backward on the full batch (reversible and plain-autograd)."""
    x, target = W.make_batch()
    model = W.build_model()
    ref = W.reference_of(model)
    full = W.build_model()
    W.loss_fn(ref, x, target).backward()
    W.loss_fn(full, x, target).backward()
    micro = 4
    for xm, tm in zip(x.chunk(micro), target.chunk(micro)):
        (W.loss_fn(model, xm, tm) / micro).backward()
    want = W.grads_of(ref)
    assert_close_grads(W.grads_of(model), want, "accumulated reversible vs plain autograd")
    assert_close_grads(W.grads_of(full), want, "full-batch reversible vs plain autograd")


# ----------------------------------------------------------------------------------------- hooks
def _hooked_params(model):
    """A parameter from each place that matters: outside the stack, F of the first block, the
    LayerNorm in G of the last block (its backward runs first)."""
    return {"inp.weight": model.inp.weight,
            "seq.blocks.0.coupling.f.1.weight": model.seq.blocks[0].coupling.f[1].weight,
            "seq.blocks.5.coupling.g.0.weight": model.seq.blocks[5].coupling.g[0].weight}


def test_param_register_hook_fires_once_per_backward_with_full_gradient():
    x, target = W.make_batch()
    model = W.build_model()
    want = W.reference_grads(model, x, target)
    seen = {name: [] for name in _hooked_params(model)}
    for name, p in _hooked_params(model).items():
        p.register_hook(lambda g, name=name: seen[name].append(g.detach().clone()))
    for step in range(1, 3):
        W.loss_fn(model, x, target).backward()
        for name, grads in seen.items():
            assert len(grads) == step, f"{name}: hook fired {len(grads)} times in {step} backward(s)"
            assert_close_grads({name: grads[-1]}, {name: want[name]}, f"hook gradient of {name}")


def test_param_post_accumulate_grad_hook_fires_once_per_backward():
    x, target = W.make_batch()
    model = W.build_model()
    want = W.reference_grads(model, x, target)
    seen = {name: [] for name in _hooked_params(model)}
    for name, p in _hooked_params(model).items():
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: seen[name].append(p.grad.detach().clone()))
    for step in range(1, 3):
        W.loss_fn(model, x, target).backward()
        for name, grads in seen.items():
            assert len(grads) == step, f"{name}: hook fired {len(grads)} times in {step} backward(s)"
            # .grad accumulates: after `step` backwards it holds step x the gradient
            assert_close_grads({name: grads[-1]}, {name: step * want[name]}, f".grad of {name}")


def test_autograd_grad_returns_gradients_without_touching_dot_grad():
    x, target = W.make_batch()
    model = W.build_model()
    want = W.reference_grads(model, x, target)
    names, params = zip(*model.named_parameters())
    got = torch.autograd.grad(W.loss_fn(model, x, target), params)
    assert all(p.grad is None for p in params), "torch.autograd.grad wrote .grad"
    assert_close_grads(dict(zip(names, got)), want, "torch.autograd.grad")


def test_fsdp2_hooks_declared_harmless_keep_the_gradient_hand_off(tmp_path):
    """fully_shard puts hooks on every block, which turns the in-place hand-off of stream gradients off
    (two copies per block); inside trusted_hooks() (what DistributedReversibleTrainer does under
    FSDP2) it stays on: only the run's last block copies. One process, gloo, file rendezvous."""
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import fully_shard
    from helpers import coupling
    from revnet_zero import ReversibleSequence
    from revnet_zero.engine import trusted_hooks
    from test_engine import _count_clones
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        stack = ReversibleSequence([coupling("additive", 8) for _ in range(6)])
        mesh = init_device_mesh("cpu", (1,))
        for block in stack.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(stack, mesh=mesh)
        x = torch.randn(2, 5, 8)

        def step():
            y1, y2 = stack(x)
            (y1.sum() + 2 * y2.sum()).backward()

        assert _count_clones(step) == 2 + 2 * 6
        with trusted_hooks():
            assert _count_clones(step) == 2 + 2
    finally:
        dist.destroy_process_group()
