"""DistributedReversibleTrainer (DDP and FSDP2) against one process with the same global batch.

Each test trains ``ReversibleGPT`` ('tiny' preset) for ``W.STEPS`` = 3 AdamW steps (warm-up, cosine
decay, weight decay, gradient clipping on) in 2 CPU processes over gloo, each rank taking its half of
every global batch through the trainer's own rank sharding, and compares the parameters and the
logged loss and gradient norm of every step with a single-process ``Trainer`` whose batch is the whole
global batch. Workers live in ``_trainer_workers.py`` (spawned processes import them by name).

Tolerances (fp32). Both sides do the same math in a different order: the batch reduction inside each
weight-gradient matmul is split in halves whose partial sums are added by the all-reduce (DDP) or
reduce-scatter (FSDP2), and FSDP2's clipping norm is assembled from per-shard partial norms. fp32
rounds each operation by up to 2**-24 ~ 6e-8; the logged losses and gradient norms agree to 2e-7
(``HISTORY_RTOL`` = 1e-5). The parameters go through AdamW, whose update m / (sqrt(v) + eps) divides
each element by its own gradient's size: an element whose gradient is near eps (1e-8) turns a
rounding-level difference of its gradient into a visible fraction of its lr-sized step. Measured,
norm-wise per parameter ||p - p_ref|| / ||p_ref||: 3.6e-6 here (one element of an attention output
projection, the smallest weights); one process accumulating 2 micro-batches of 2 against one batch of
4 (the same summation split without any communication) gives the same 3.6e-6, and 40 seeds of that
ranged 2e-7 to 3.6e-6. The bugs this is meant to catch measured, on the same run: clipping FSDP2
shards by their local norm 7.8e-3, no clipping 1.1e-2, both ranks on the same half batch 0.29.
``PARAM_RTOL`` = 1e-4 lies between. A sum instead of a mean over ranks leaves the parameters
unchanged (clipping and AdamW are scale-invariant) but doubles the logged gradient norm, which the
history comparison catches.
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # spawned workers import it by name
import _trainer_workers as W  # noqa: E402

from revnet_zero.training import DistributedReversibleTrainer, Trainer, TrainingConfig  # noqa: E402

PARAM_RTOL = 1e-4
HISTORY_RTOL = 1e-5
# bf16 (mixed precision) against one process under bf16 autocast: bf16 keeps 8 significant bits
# (rounding 2**-9 ~ 2e-3 per operation), and the two sides round in different places (FSDP2 rounds
# the weights themselves to bf16, including RMSNorm gains and the embedding, which autocast leaves
# in fp32). Measured: the losses agree to 2e-4 and the gradient norms to 3e-3; each parameter's
# distance from the reference is 5% of the distance the reference moved it in 3 steps (bf16
# autocast against fp32 in one process: 10%). The data and clipping bugs above move parameters by
# more than their whole 3-step update.
BF16_HISTORY_RTOL = 2e-2
BF16_UPDATE_RTOL = 0.25
BLOCKS = ["blocks.blocks.0", "blocks.blocks.1"]  # the tiny preset's 2 ReversibleBlocks

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not in this build")


def _fsdp2_missing() -> str | None:
    try:
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401
        except ImportError:
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
    except ImportError as e:
        return f"FSDP2 (fully_shard / init_device_mesh) is not in this torch build: {e}"
    return None


needs_fsdp2 = pytest.mark.skipif(_fsdp2_missing() is not None, reason=str(_fsdp2_missing()))


@pytest.fixture(scope="module")
def reference():
    """One process, plain Trainer, the whole global batch per step (fp32)."""
    return W.single_process_run()


@pytest.fixture(scope="module")
def bf16_reference():
    """The same under bf16 autocast (fp32 weights)."""
    return W.single_process_run(precision="bf16")


def assert_same_run(results: list[dict], ref: dict, what: str) -> None:
    for rank, res in enumerate(results):
        err, name = W.worst_rel_err(res["params"], ref["params"])
        assert err <= PARAM_RTOL, f"{what}, rank {rank}: parameters off by {err:.3g} > {PARAM_RTOL} ({name})"
        assert len(res["history"]) == W.STEPS
        for got, want in zip(res["history"], ref["history"]):
            for key in ("loss", "grad_norm"):
                assert got[key] == pytest.approx(want[key], rel=HISTORY_RTOL), \
                    f"{what}, rank {rank}, step {want['step']}: {key} {got[key]} != {want[key]}"
            assert got["lr"] == want["lr"]
    for name, p in results[0]["params"].items():  # every rank holds the same full parameters
        torch.testing.assert_close(results[1]["params"][name], p, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_trainer_equals_single_process_with_the_global_batch(reference, accum):
    """DDP, 2 ranks x (GLOBAL_BATCH / 2) sequences per step == one process x GLOBAL_BATCH. With
    ``accum`` = 2 each rank accumulates 2 micro-batches of 1 sequence, the first under ``no_sync()``."""
    results = W.run_workers("trainer_worker", sharding_strategy="ddp", gradient_accumulation_steps=accum)
    assert_same_run(results, reference, f"DDP, accumulation {accum}")
    seen = results[0]["seen"]
    assert seen["forward_param"] == seen["stream"] == seen["grad"] == ["torch.float32"]
    assert results[0]["param_types"] == ["Parameter"]


# ----------------------------------------------------------------------------------------- FSDP2
@pytest.mark.slow
@needs_gloo
@needs_fsdp2
@pytest.mark.parametrize("accum", [1, 2])
def test_fsdp2_trainer_equals_single_process_with_the_global_batch(reference, accum):
    """FSDP2: ``fully_shard`` on each ReversibleBlock and on the root; parameters gathered with
    ``full_tensor()`` after 3 steps equal the single-process run. Clipping needs the global norm
    over both ranks' shards (a local norm is 7.8e-3 off, see the module docstring)."""
    results = W.run_workers("trainer_worker", sharding_strategy="fsdp", gradient_accumulation_steps=accum)
    assert_same_run(results, reference, f"FSDP2, accumulation {accum}")
    res = results[0]
    assert res["fsdp_modules"] == ["", *BLOCKS], "fully_shard per block, then the root"
    assert res["param_types"] == ["DTensor"] and res["offload_to_cpu"] == [False]
    seen = res["seen"]
    for key in ("forward_param", "root_param", "stream", "grad", "all_gather", "reduce_scatter"):
        assert seen[key] == ["torch.float32"], (key, seen[key])


@pytest.mark.slow
@needs_gloo
@needs_fsdp2
def test_fsdp2_cpu_offload_equals_single_process(reference):
    """``cpu_offload=True``: FSDP2's CPUOffloadPolicy (unpinned here: pinning needs CUDA) on every
    sharded module; the step, clipping and AdamW run on the host-side shards, and the result is the
    fp32 run's. On this CPU-only machine host and device are the same memory, so the test shows
    that the offload path runs end to end and exactly, not a saving of device memory."""
    results = W.run_workers("trainer_worker", sharding_strategy="fsdp", cpu_offload=True)
    assert_same_run(results, reference, "FSDP2 with CPU offload")
    res = results[0]
    assert res["fsdp_modules"] == ["", *BLOCKS] and res["offload_to_cpu"] == [True]
    assert res["seen"]["optimizer_param_device"] == res["seen"]["optimizer_state_device"] == ["cpu"]


@pytest.mark.slow
@needs_gloo
@needs_fsdp2
@pytest.mark.parametrize("cpu_offload", [False, True])
def test_fsdp2_mixed_precision_policy_is_applied(bf16_reference, cpu_offload):
    """``mixed_precision=True``: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32,
    cast_forward_inputs=False) on every block and the root, with bf16 autocast.

    Observed inside the run: the blocks' and the root's parameters are bf16 in forward, the
    all-gathers carry bf16 and the reduce-scatters fp32, the reversible streams entering each block
    stay fp32 (cast_forward_inputs=False), and AdamW steps fp32 shards with fp32 gradients. The
    result matches one process under bf16 autocast with the same global batch to bf16 tolerance."""
    ref = bf16_reference
    results = W.run_workers("trainer_worker", sharding_strategy="fsdp", mixed_precision=True,
                            cpu_offload=cpu_offload)
    for rank, res in enumerate(results):
        seen = res["seen"]
        assert res["precision"] == "bf16"
        assert seen["forward_param"] == seen["root_param"] == seen["all_gather"] == ["torch.bfloat16"], seen
        assert seen["reduce_scatter"] == seen["grad"] == seen["optimizer_param"] == ["torch.float32"], seen
        assert seen["stream"] == ["torch.float32"], "a block's input streams were cast to bf16"
        assert res["fsdp_modules"] == ["", *BLOCKS] and res["offload_to_cpu"] == [cpu_offload]
        for name, p in res["params"].items():
            assert p.dtype == torch.float32
            moved = (ref["params"][name] - ref["initial"][name]).norm()
            off = (p - ref["params"][name]).norm()
            assert off <= BF16_UPDATE_RTOL * moved, \
                f"rank {rank} {name}: {off:.3g} from the bf16 reference, which moved it by {moved:.3g}"
        for got, want in zip(res["history"], ref["history"]):
            for key in ("loss", "grad_norm"):
                assert got[key] == pytest.approx(want[key], rel=BF16_HISTORY_RTOL), (rank, key, got, want)
    for name, p in results[0]["params"].items():
        torch.testing.assert_close(results[1]["params"][name], p, rtol=0, atol=0)


# ----------------------------------------------------------------------------- FSDP2 checkpoints
@pytest.fixture(scope="module")
def fsdp_checkpoints(tmp_path_factory):
    """A single-process checkpoint after ``W.HALF`` steps, then ``W.fsdp_checkpoint_worker`` in 2
    processes (runs A to D, see there)."""
    single = tmp_path_factory.mktemp("single")
    trainer = Trainer(W.build_model(), **W.TRAIN, batch_size=W.GLOBAL_BATCH, out_dir=str(single))
    trainer.train(train_dataset=W.dataset(), num_steps=W.HALF)
    out_dir = tmp_path_factory.mktemp("fsdp")
    results = W.run_workers("fsdp_checkpoint_worker", out_dir=str(out_dir),
                            single_checkpoint=str(single / "checkpoints"))
    return {"results": results, "out_dir": out_dir, "single": trainer}


@pytest.mark.slow
@needs_gloo
@needs_fsdp2
def test_fsdp2_resume_from_checkpoint_is_bitwise(fsdp_checkpoints):
    """FSDP2, 2 ranks: 4 steps straight (A) == 2 steps, checkpoint, 2 more (B, which saves every 2
    steps) == a fresh model and trainer in the same processes that loads B's step-2 checkpoint and
    trains 2 more (C): parameters (gathered) bitwise equal, logged losses, gradient norms and lrs
    equal. The checkpoint holds the full weights and optimizer state gathered on rank 0 and each
    rank's RNG state."""
    for rank, res in enumerate(fsdp_checkpoints["results"]):
        a, b, c = res["A"], res["B"], res["C"]
        assert [h["step"] for h in c["history"]] == [3, 4], c["history"]
        assert b["history"] == a["history"], f"rank {rank}: writing a checkpoint changed the run"
        assert c["history"] == a["history"][W.HALF:], f"rank {rank}: the resumed run logged otherwise"
        for name, p in a["params"].items():
            assert torch.equal(b["params"][name], p), f"rank {rank} {name}: saving changed the run"
            assert torch.equal(c["params"][name], p), f"rank {rank} {name}: resumed run differs"
    state = torch.load(fsdp_checkpoints["out_dir"] / "checkpoints" / "step-000002" / "trainer.pt",
                       weights_only=True)
    assert [sorted(r) for r in state["rng"]] == [["cpu", "cuda"]] * W.WORLD, "one RNG state per rank"


@pytest.mark.slow
@needs_gloo
@needs_fsdp2
def test_fsdp2_checkpoint_loads_in_one_process_and_back(fsdp_checkpoints):
    """The files are those of one process: FSDP2's step-4 checkpoint loads into a plain ``Trainer``
    with the parameters FSDP2 held (gathered), and its optimizer state keyed by number as torch.optim
    writes it; a single-process checkpoint loads into FSDP2 with its parameters and AdamW moments."""
    b = fsdp_checkpoints["results"][0]["B"]
    model = W.build_model(seed=1)
    trainer = Trainer(model, **W.TRAIN)
    trainer.load(fsdp_checkpoints["out_dir"] / "checkpoints")
    assert trainer.step == 2 * W.HALF
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), b["params"][name]), name
    params = list(model.parameters())
    state = trainer.optimizer.state_dict()["state"]
    assert sorted(state) == list(range(len(params)))
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            assert trainer.optimizer.state[p]["exp_avg"].shape == p.shape
            assert trainer.optimizer.state[p]["step"].item() == 2 * W.HALF

    single = fsdp_checkpoints["single"]
    names = {id(p): name for name, p in single.module.named_parameters()}
    for rank, res in enumerate(fsdp_checkpoints["results"]):
        d = res["D"]
        assert d["step"] == W.HALF
        for name, p in single.module.named_parameters():
            assert torch.equal(d["params"][name], p.detach()), f"rank {rank} {name}"
        for p, s in single.optimizer.state.items():
            assert torch.equal(d["exp_avg"][names[id(p)]], s["exp_avg"]), f"rank {rank} {names[id(p)]}"


def test_mixed_precision_refuses_what_contradicts_it():
    """Checked before torch.distributed is needed, so no processes are started."""
    with pytest.raises(ValueError, match="mixed_precision=True needs sharding_strategy='fsdp'"):
        DistributedReversibleTrainer(W.build_model(), sharding_strategy="ddp", mixed_precision=True)
    with pytest.raises(ValueError, match="precision='fp16' contradicts it"):
        DistributedReversibleTrainer(W.build_model(), mixed_precision=True, precision="fp16")
    with pytest.raises(ValueError, match="precision='fp32' contradicts it"):
        DistributedReversibleTrainer(W.build_model(), mixed_precision=True,
                                     config=TrainingConfig(precision="fp32"))
