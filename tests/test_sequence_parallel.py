"""Sequence parallelism (``revnet_zero.distributed``) against one process holding the whole sequence.

Each rank holds S/N tokens; attention exchanges them by all-to-all (head shards) or gathers keys and
values. The loss and every gradient must equal one process running the whole sequence, through the
reversible backward (which repeats the collectives in its recompute) and with FSDP2 around it.
Processes: 2 or 4 on CPU, gloo (``_spawn.py``).

Tolerance (fp32, norm-wise relative error per parameter): the split run sums each weight gradient
over tokens in N partial sums added by the all-reduce, and the loss in N partial sums; the rest is
the same arithmetic. Measured 3.5e-7 to 4.3e-7 over 2 and 4 ranks, both modes, 1, 2 and 4 key/value
heads; a wrong position offset or a missing share of the loss is O(1e-2) or more. 1e-6 separates them.
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # spawned workers import it by name
import _sp_workers as W  # noqa: E402
import _trainer_workers as T  # noqa: E402
from helpers import worst_rel_err  # noqa: E402

RTOL = 1e-6
SEQ_ODD = W.SEQ - 1
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                                   reason="torch.distributed with gloo is not in this build")]


def _assert_equal_to_one_process(results, what):
    for rank, r in enumerate(results):
        want = r["want"]
        assert torch.allclose(r["loss"], want["loss"], rtol=RTOL, atol=0), \
            f"{what} rank {rank}: loss {r['loss'].item()} vs one process {want['loss'].item()}"
        err, name = worst_rel_err(r["grads"], want["grads"])
        assert err <= RTOL, f"{what} rank {rank}: gradient of {name} off by {err:.3g} (> {RTOL})"


@pytest.mark.parametrize("mode,world,num_kv_heads", [("all_to_all", 2, 2), ("all_gather", 2, 2), ("ring", 2, 2),
                                                      ("all_to_all", 4, 1), ("all_gather", 4, 2), ("ring", 4, 1)])
def test_loss_and_gradients_equal_one_process(mode, world, num_kv_heads):
    """Every mode over 2 and 4 ranks; GQA with key/value heads dividing the ranks (2 over 2) and fewer
    than the ranks (2 and 1 over 4: repeated up to the query heads). Ring over 4 ranks cuts the 24
    positions into 8 chunks of 3, each rank holding chunks r and 7 - r."""
    results = W.run("sp_worker", world, mode=mode, num_kv_heads=num_kv_heads, policy="recompute")
    _assert_equal_to_one_process(results, f"{mode} over {world} ranks, {num_kv_heads} kv heads")


@pytest.mark.parametrize("mode", ["all_to_all", "ring"])
def test_bidirectional_encoder_equals_one_process(mode):
    """ReversibleBERT (no causal mask): all-to-all and the ring without load balancing (contiguous shards)."""
    results = W.run("sp_worker", 2, mode=mode, num_kv_heads=2, policy="recompute", bert=True)
    _assert_equal_to_one_process(results, f"BERT, {mode}")


@pytest.mark.parametrize("mode", ["all_to_all", "ring"])
def test_a_batch_without_targets_gives_zero_gradients_as_one_process(mode):
    """Every label -100 (a micro-batch of prompt only): one process returns a NaN loss and zero
    gradients; the split model must not turn its 0 / 0 loss scale into NaN gradients."""
    for rank, r in enumerate(W.run("sp_no_targets_worker", 2, mode=mode)):
        assert r["loss"].isnan() and r["want"]["loss"].isnan(), (rank, r["loss"], r["want"]["loss"])
        for name, g in r["grads"].items():
            assert torch.equal(g, r["want"]["grads"][name]), f"rank {rank}: {name} {g.abs().max()}"


@pytest.mark.parametrize("mode", ["all_to_all", "ring"])
def test_enabling_on_a_ddp_wrapper_splits_the_model_inside(mode):
    """The model inside the wrapper shards its inputs too (it used to keep the whole sequence on every
    rank while attention took it for a shard: gradients 40 % off, silently)."""
    _assert_equal_to_one_process(W.run("sp_enable_after_ddp_worker", 2, mode=mode), f"DDP, then {mode}")


def test_ring_on_a_group_of_one_rank_takes_any_length():
    """One rank holds the whole sequence in order: no head-tail chunks, so an odd length (23) runs
    (it was refused as 'not divisible by 2')."""
    _assert_equal_to_one_process(W.run("sp_group_of_one_worker", 2, seq=SEQ_ODD), "ring over a group of one")


def test_ring_in_float64_equals_one_process_to_float64_precision():
    """float64 merges its partial outputs in float64 (torch would merge in float32 by default): the ring
    over 4 ranks agrees with one process to 1e-12 (measured 9e-16); a float32 merge leaves 1.1e-7
    (measured by forcing it). float64 streams too: the default float32 streams alone cost 1.5e-7."""
    for rank, r in enumerate(W.run("sp_worker", 4, mode="ring", num_kv_heads=2, policy="recompute",
                                   dtype="float64", stream_dtype=torch.float64)):
        assert torch.allclose(r["loss"], r["want"]["loss"], rtol=1e-12, atol=0), (rank, r["loss"])
        err, name = worst_rel_err(r["grads"], r["want"]["grads"])
        assert err <= 1e-12, f"rank {rank}: gradient of {name} off by {err:.3g}"


@pytest.mark.parametrize("mode,policy", [("all_to_all", "store_attention"), ("all_to_all", "store"),
                                         ("ring", "store_attention"), ("ring", "store")])
def test_memory_policies_compose(mode, policy):
    """Kept attention (the recompute skips the kernel but repeats the collectives; for the ring, the
    backward ring runs from the kept output) and plain autograd."""
    _assert_equal_to_one_process(W.run("sp_worker", 2, mode=mode, num_kv_heads=2, policy=policy),
                                 f"{mode}, {policy}")


def test_scheduler_plans_one_policy_list_for_the_ranks_of_a_sequence():
    """Per-rank profiles that favour different policies (rank 0: store, rank 1: recompute): every rank
    takes the group's first rank's plan, so the collectives pair up and gradients equal one process."""
    results = W.run("sp_scheduler_worker", 2)
    assert results[0]["policies"] == results[1]["policies"] == ["store"] * 3, [r["policies"] for r in results]
    _assert_equal_to_one_process(results, "ring + MemoryScheduler")


@pytest.mark.parametrize("mode", ["all_to_all", "all_gather", "ring"])
def test_fsdp2_per_block_composes(mode):
    _assert_equal_to_one_process(W.run("sp_fsdp2_worker", 2, mode=mode), f"FSDP2 + {mode}")


@pytest.mark.parametrize("mode", ["all_to_all", "ring"])
def test_eval_forward_equals_one_process(mode):
    for r in W.run("sp_eval_worker", 2, mode=mode):
        assert torch.allclose(r["loss"], r["want"], rtol=RTOL, atol=0), (r["loss"], r["want"])


def test_bad_configurations_are_refused_with_the_values():
    messages = W.run("sp_refusals_worker", 2)[0]
    assert "divisible by 2, got 25" in messages["odd length"]
    assert "3 attention heads" in messages["heads"] and "all_gather" in messages["heads"]
    assert "'ring'" in messages["mode"] and "'ring_flash'" in messages["mode"]
    assert "divisible by 4, got 22" in messages["ring length"] and "two per rank" in messages["ring length"]
    assert "attention_dropout=0.1" in messages["ring dropout"]
    assert "without a mask" in messages["ring mask"]
    assert "disable_sequence_parallel" in messages["generate"]
    assert "SlidingWindowAttention" in messages["variant"] and "softmax" in messages["variant"]
    assert "rank 0 of 2 got input_ids (1, 24)" in messages["different ids"]
    assert "must pass the same full batch" in messages["different labels"]
    assert "got input_ids (2, 24)" in messages["different lengths"]
    assert messages["pickle"].startswith("TypeError: SequenceParallel(mode='ring', size=2, rank=0) holds a "
                                         "process group") and "state_dict" in messages["pickle"]
    assert all(m.startswith("ValueError") for k, m in messages.items() if k != "pickle"), messages


@pytest.fixture(scope="module")
def reference():
    return T.single_process_run()


@pytest.mark.parametrize("world,strategy,mode", [(2, "ddp", "all_to_all"), (4, "fsdp", "all_to_all"),
                                                 (4, "fsdp", "ring")])
def test_trainer_equals_one_process_with_the_global_batch(reference, world, strategy, mode):
    """``sequence_parallel=2``: 2 ranks split each sequence; over 4 ranks, 2 data shards of 2 (for the
    ring: two rings of 2 ranks, each on its own process group)."""
    for rank, r in enumerate(W.run("trainer_worker", world, sequence_parallel=2, sharding_strategy=strategy,
                                   sequence_parallel_mode=mode)):
        for got, want in zip(r["history"], reference["history"]):
            assert got["loss"] == pytest.approx(want["loss"], rel=RTOL), (rank, got, want)
        err, name = worst_rel_err(r["params"], reference["params"])
        assert err <= 1e-5, f"rank {rank}: {name} off by {err:.3g} after {T.STEPS} AdamW steps"


def test_trainer_resume_is_bitwise(tmp_path):
    whole = W.run("trainer_worker", 2, sequence_parallel=2, sharding_strategy="ddp")
    W.run("trainer_worker", 2, sequence_parallel=2, sharding_strategy="ddp", out_dir=str(tmp_path), steps=T.HALF)
    resumed = W.run("trainer_worker", 2, sequence_parallel=2, sharding_strategy="ddp", out_dir=str(tmp_path),
                    resume=True)
    for a, b in zip(resumed, whole):
        for name in b["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), f"{name} differs after resume"


def test_trainer_refuses_a_group_size_that_does_not_divide_the_world():
    msg = W.run("trainer_refusal_worker", 2)[0]
    assert "dividing the world size 2, got 3" in msg


def test_trainer_refuses_an_unknown_mode_even_without_splitting():
    """sequence_parallel=1 splits nothing, but a misspelt mode is still an error (it was ignored until
    the first run with sequence_parallel > 1)."""
    msg = W.run("trainer_refusal_worker", 2, sequence_parallel=1, sequence_parallel_mode="rnig")[0]
    assert "sequence_parallel_mode must be one of" in msg and "'rnig'" in msg, msg


def test_launcher_smoke_on_cpu(tmp_path):
    """The GPU sweep's own code path at tiny sizes: torchrun with 1 and 2 CPU processes (gloo), every
    mode (all-to-all, all-gather, ring), the 1-vs-2 gradient check, and the weak-scaling table."""
    from revnet_zero.benchmarks import sequence_parallel as bench
    bench.main(["sweep", "--gpus", "1,2", "--model", "tiny", "--lengths", "16,32", "--repeats", "1",
                "--grad-check", "--grad-check-len", "32", "--out-dir", str(tmp_path), "--timeout-s", "300"])
    rows = __import__("json").loads(next(tmp_path.glob("sequence_parallel_*.json")).read_text())
    steps = [r for r in rows if r["kind"] == "step"]
    assert {(r["gpus"], r["mode"]) for r in steps} == {(1, "single"), (2, "all_to_all"), (2, "all_gather"),
                                                        (2, "ring")}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in steps)
    assert all("weak_scaling_efficiency" in r for r in steps)
    checks = [r for r in rows if r["kind"] == "grad_check"]
    assert len(checks) == 3 and all(r["grad_rel_err"] < 1e-5 for r in checks), checks
    assert "weak-scaling" in next(tmp_path.glob("sequence_parallel_*.md")).read_text()


@pytest.mark.parametrize("args,quoted", [
    (["--modes", "ring,bogus"], "'ring,bogus'"),
    (["--modes", "ring", "--lengths", "15,16"], "'15,16'"),   # 15 x 2 tokens do not cut into 4 chunks
    (["--modes", "ring", "--grad-check", "--grad-check-len", "30"], "--grad-check-len 30"),
    (["--repeats", "0"], "got 0"),
    (["--policy", "stor"], "'stor'"),
    (["--gpus", "0,2"], "'0,2'"),
])
def test_launcher_refuses_a_sweep_that_cannot_run_before_launching(tmp_path, args, quoted):
    """Every run of such a sweep would fail the same way (or, for one odd length, lose the lengths
    after it): a ValueError quoting the value comes before any torchrun starts."""
    from revnet_zero.benchmarks import sequence_parallel as bench
    with pytest.raises(ValueError, match=__import__("re").escape(quoted)):
        bench.main(["sweep", "--gpus", "1,2", "--model", "tiny", "--lengths", "16", "--repeats", "1",
                    "--out-dir", str(tmp_path), "--timeout-s", "120", *args])
    assert not list(tmp_path.iterdir()), "nothing is launched or written"


def test_launcher_timeout_is_a_row_not_the_end_of_the_sweep(tmp_path):
    """A run past --timeout-s (a hung collective) is killed with its workers and reported; the sweep
    goes on and writes its files (it used to raise subprocess.TimeoutExpired and lose every row)."""
    from revnet_zero.benchmarks import sequence_parallel as bench
    bench.main(["sweep", "--gpus", "1", "--model", "tiny", "--lengths", "8k", "--repeats", "1",
                "--out-dir", str(tmp_path), "--timeout-s", "1"])
    rows = __import__("json").loads(next(tmp_path.glob("sequence_parallel_*.json")).read_text())
    assert rows == [{"kind": "error", "gpus": 1, "mode": "single", "exit_code": None, "timed_out_s": 1}], rows
    assert "ran past --timeout-s 1 and was killed" in next(tmp_path.glob("sequence_parallel_*.md")).read_text()
