"""The benchmark suite on CPU: rows, modes, writers, plots, search logic. Speed and memory themselves
are measured on the GPU machine (python -m revnet_zero.benchmarks.run), never asserted here."""
import importlib.util
import json
import os
import sys

import pytest
import torch
from torch import nn

from revnet_zero.benchmarks import (PURE_MODES, BenchmarkSuite, apply_mode, bytes_per_token, compare_grads,
                                    depth_ratios, policy_modes, read_json, write_json)
from revnet_zero.benchmarks import report
from revnet_zero.benchmarks.measure import random_ids
from revnet_zero.benchmarks.modes import CheckpointedStack
from revnet_zero.benchmarks.suite import _next_try, predict_step_seconds
from revnet_zero.models import ReversibleGPT, TransformerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Gradient tolerance per mode against 'standard', fp32 on CPU.
GRAD_TOL = {
    "full_ac": 1e-6,        # the same ops recomputed in the same order: bitwise equal in practice
    "selective_ac": 1e-6,   # as full_ac; the kept matmul/SDPA outputs are the very tensors of forward
    "ac_offload": 1e-6,     # as full_ac; the block inputs make a round trip through host memory, exactly
    "full_ac:no_early_stop": 1e-6,   # as full_ac; the recompute also runs the ops whose outputs are unused
    "revnet_zero": 1e-5,    # inputs rebuilt by subtraction in fp32 (the engine's contract: <= 1e-6 per block)
    **{m: 1e-5 for m in policy_modes()},   # as revnet_zero, with some tensors kept instead of recomputed
}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ReversibleGPT(TransformerConfig.preset("tiny"))


class OomAbove(nn.Module):
    """A model that runs ``inner`` but raises CUDA's out-of-memory error beyond ``limit`` tokens."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.config = inner, limit, inner.config

    def forward(self, ids):
        if ids.numel() > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (fake, {ids.numel()} > {self.limit} tokens)")
        return self.inner(ids)


def test_suite_runs_every_pure_mode_and_rows_carry_the_protocol_fields(tiny):
    suite = BenchmarkSuite(device="cpu", repeats=2)
    rows = suite.run({"tiny": tiny}, sequence_lengths=[16, 23], batch_sizes=[2, 1],
                     metrics=["memory", "throughput", "energy"], modes=PURE_MODES)
    assert [(r["mode"], r["seq_len"], r["batch"]) for r in rows] == \
        [(m, 16, 2) for m in PURE_MODES] + [(m, 23, 1) for m in PURE_MODES]
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert r["step_s"] > 0 and len(r["step_times"]) == 2
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_s"])
        assert r["peak_gib"] is None and r["energy_j_per_token"] is None   # CPU: wall clock only
        assert r["energy_note"] == "no CUDA device"
        assert r["sdpa_backend"] not in (None, "", "none")
        assert r["gpu"] == "cpu" and r["torch"] == torch.__version__ and r["commit"] and r["date"]
        assert r["layers"] == 2 and r["d_model"] == 96 and r["amp"] == "fp32"
    assert len({r["loss"] for r in rows if r["seq_len"] == 16}) == 1          # same batch, same loss


def test_pure_modes_and_engine_policies_give_the_loss_and_gradients_of_standard_fp32(tiny):
    ids = random_ids(256, 2, 23, torch.device("cpu"))
    rows = compare_grads(tiny, ids, None, [m for m in PURE_MODES if m != "standard"] + policy_modes())
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        assert r["loss_rel_diff"] <= 1e-6, r
        assert r["max_rel_err"] <= GRAD_TOL[r["mode"]], r
    assert all(p.grad is None for p in tiny.parameters())


def test_full_ac_early_stop_skips_each_blocks_last_projection_and_the_diagnostic_mode_does_not(tiny):
    """torch.utils.checkpoint's early stop: the recompute ends once the last saved tensor is rebuilt,
    so the FFN's output projection (whose backward needs only its input) never runs again."""
    ids = random_ids(256, 2, 23, torch.device("cpu"))
    calls = []
    hooks = [b.coupling.g.w_out.register_forward_hook(lambda *a: calls.append(1)) for b in tiny.blocks.blocks]
    try:
        counts = {}
        for mode in ("full_ac", "full_ac:no_early_stop"):
            calls.clear()
            with apply_mode(tiny, mode):
                tiny(ids).loss.backward()
            counts[mode] = len(calls)
        tiny.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
    L = len(tiny.blocks.blocks)
    assert counts == {"full_ac": L, "full_ac:no_early_stop": 2 * L}
    rows = compare_grads(tiny, ids, None, ["full_ac:no_early_stop"])
    assert rows[0]["status"] == "ok" and rows[0]["max_rel_err"] <= GRAD_TOL["full_ac:no_early_stop"], rows


def test_apply_mode_swaps_the_stack_and_restores_it_even_after_an_error(tiny):
    seq, policies = tiny.blocks, [b.policy for b in tiny.blocks.blocks]
    with pytest.raises(RuntimeError, match="inside"):
        with apply_mode(tiny, "selective_ac"):
            assert isinstance(tiny.blocks, CheckpointedStack) and tiny.blocks.seq is seq
            assert all(b.policy == "store" for b in seq.blocks)
            raise RuntimeError("inside")
    assert tiny.blocks is seq and [b.policy for b in seq.blocks] == policies
    with apply_mode(tiny, "revnet_zero"):
        assert tiny.blocks is seq and all(b.policy == "recompute" for b in seq.blocks)
    with pytest.raises(ValueError, match="unknown engine policy 'nope'"):
        with apply_mode(tiny, "revnet_zero:nope"):
            pass
    with pytest.raises(ValueError, match="unknown benchmark mode"):
        with apply_mode(tiny, "fast"):
            pass


def test_a_mode_stops_at_its_first_out_of_memory(tiny):
    rows = BenchmarkSuite(device="cpu", repeats=1).run({"m": OomAbove(tiny, 20)}, [8, 24, 32], 1)
    assert [r["status"] for r in rows] == ["ok", "oom", "skipped"]
    assert "OutOfMemoryError" in rows[1]["error"] and rows[2]["error"] == "stopped after oom at 24"
    again = BenchmarkSuite(device="cpu", repeats=1).run({"m": OomAbove(tiny, 20)}, [8, 16, 32], 1, previous=rows)
    assert [(r["seq_len"], r["status"]) for r in again] == [(16, "ok"), (32, "skipped")]  # 8 is not repeated


def test_a_peer_that_is_not_installed_gives_an_error_row_with_the_install_hint(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "memcnn", None)        # import memcnn now raises ImportError
    [row] = BenchmarkSuite(device="cpu", repeats=1).run({"tiny": tiny}, [16], 1, modes=["memcnn"])
    assert row["status"] == "error" and "memcnn==1.5.2" in row["error"]
    assert tiny.blocks.__class__.__name__ == "ReversibleSequence"


@pytest.mark.parametrize("peer", ["memcnn", "revlib"])
def test_peer_stacks_give_the_gradients_of_standard_when_installed(tiny, peer):
    pytest.importorskip(peer)
    ids = random_ids(256, 1, 17, torch.device("cpu"))
    [r] = compare_grads(tiny, ids, None, [peer])
    assert r["status"] == "ok" and r["max_rel_err"] <= 1e-5, r


def test_results_round_trip_through_json_and_markdown(tmp_path):
    rows = [_row("standard", 1024, 1.0, 0.1), _row("revnet_zero", 1024, 0.5, 0.12),
            {**_row("standard", 2048, None, None), "status": "oom", "error": "OutOfMemoryError: x | y"}]
    results = {"meta": {"sdpa_backend": "flash"}, "rows": rows,
               "sdpa": [{"backend": "flash", "seq_len": 1024, "fwd_s": 1e-3, "bwd_s": 2e-3, "fwd_tflops": 300.0,
                         "bwd_tflops": 250.0}], "grads": [], "maxctx": []}
    path = str(tmp_path / "modes_cpu_2026-01-01.json")
    write_json(path, results)
    assert read_json(path) == json.loads(json.dumps(results))
    md = report.to_markdown(read_json(path), "title")
    assert "| cpu" not in md and "- gpu: cpu" in md and "- commit: abc1234" in md
    assert "| m | 4 | revnet_zero | 1024 | 1 | ok | 0.120 | 1.20x |" in md
    assert "0.50x" in md and "oom: OutOfMemoryError: x / y" in md and "**flash**" in md
    merged = report.merge_rows(rows, [_row("standard", 1024, 2.0, 0.2)])
    assert len(merged) == 3 and merged[-1]["peak_gib"] == 2.0
    with pytest.raises(ValueError, match="unknown results sections"):
        write_json(path, {"rows": [], "extra": []})


def test_bytes_per_token_and_depth_ratio_from_rows():
    rows = [_row("full_ac", s, 1.0 + s * 1000 / 2 ** 30, 1.0) for s in (1024, 2048, 4096)]
    [slope] = bytes_per_token(rows)
    assert slope["bytes_per_token"] == pytest.approx(1000) and slope["intercept_gib"] == pytest.approx(1.0)
    deep = [{**_row("full_ac", 1024, 3.0, 1.0), "layers": 24, "static_gib": 2.0, "model": "m24"},
            {**_row("full_ac", 1024, 1.5, 1.0), "layers": 4, "static_gib": 0.5}]
    [d] = depth_ratios(deep)
    assert d["layers"] == [4, 24] and d["peak_ratio"] == pytest.approx(2.0) and d["activation_ratio"] == 1.0


def test_plots_are_written_as_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    rows = [_row(m, s, 1.0 * s / 1024, 0.1 * s / 1024) for m in ("standard", "full_ac") for s in (1024, 2048)]
    rows.append({**_row("standard", 4096, None, None), "status": "oom"})
    [path] = BenchmarkSuite(device="cpu").plot_results(rows, str(tmp_path / "r.png"))
    monkeypatch.chdir(tmp_path)
    [bare] = report.plot_results(rows, "png")
    single = report.plot_metric(rows, "peak_gib", str(tmp_path / "m.png"), "GiB")
    for p in (path, tmp_path / bare, single):
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_step_time_prediction_and_the_context_search_steps():
    assert predict_step_seconds([], 1000) == 0
    assert predict_step_seconds([(1000, 1.0)], 2000) == pytest.approx(4.0)          # all-quadratic
    assert predict_step_seconds([(1000, 1.0), (2000, 2.0)], 4000, margin=1) == pytest.approx(4.0)  # linear
    assert _next_try(16, None, 1024, 8) == 32 and _next_try(1024, None, 1024, 8) is None
    assert _next_try(64, 128, 1024, 8) == 96 and _next_try(96, 104, 1024, 8) is None
    assert _next_try(None, 64, 1024, 8) == 32


def test_max_context_finds_the_limit_by_doubling_then_bisection(tiny):
    res = BenchmarkSuite(device="cpu").max_context(OomAbove(tiny, 100), None, start=16, limit=1024, granularity=8)
    assert res["max_ok"] <= 100 < res["first_fail"] and res["first_fail"] - res["max_ok"] <= 8
    assert [t["seq_len"] for t in res["tries"]][:4] == [16, 32, 64, 128] and res["stopped"] is None


def test_runner_writes_table_json_and_plots_on_cpu(tmp_path, capsys):
    from revnet_zero.benchmarks import run
    out = str(tmp_path)
    assert run.main(["--config", "tiny", "--layers", "1", "--modes", "standard,revnet_zero", "--lengths", "16",
                     "--repeats", "1", "--check-grads", "16", "--grad-modes", "revnet_zero", "--out", out,
                     "--alloc-conf", "", "--commit", "abc"]) == 0
    stem = os.path.join(out, f"grads_modes_cpu_{read_json_date(out)}")
    plots = ("_memory.png", "_throughput.png") if importlib.util.find_spec("matplotlib") else ()
    for suffix in (".md", ".json", *plots):
        assert os.path.exists(stem + suffix), suffix
    results = read_json(stem + ".json")
    assert [r["mode"] for r in results["rows"]] == ["standard", "revnet_zero"]
    assert results["grads"][0]["status"] == "ok" and results["rows"][0]["commit"] == "abc"
    assert "| tiny-L1 | 1 | revnet_zero | 16 |" in capsys.readouterr().out


def read_json_date(folder):
    [name] = [n for n in os.listdir(folder) if n.endswith(".json")]
    return name.rsplit("_", 1)[1].removesuffix(".json")


def _row(mode, seq_len, peak, step):
    return {"model": "m", "layers": 4, "mode": mode, "seq_len": seq_len, "batch": 1, "tokens": seq_len,
            "status": "ok", "error": None, "step_s": step, "tokens_per_s": seq_len / step if step else None,
            "peak_gib": peak, "static_gib": 0.5 if peak else None, "energy_j_per_token": None,
            "sdpa_backend": "flash", "gpu": "cpu", "torch": "2", "commit": "abc1234", "date": "2026-01-01",
            "amp": "bf16", "d_model": 64}


def _script(name):
    """A script of the repository's benchmarks/ folder, imported as ``benchmarks.<name>`` (pytest puts the
    repository root on sys.path: ``pythonpath`` in pyproject.toml)."""
    return importlib.import_module(f"benchmarks.{name}")


def test_kept_bytes_measure_gives_the_known_answers(monkeypatch):
    """The method behind conversion_kept_*.md, on a tiny Llama (d=64): checkpointing keeps each layer's
    float32 input (4 * 64 = 256 bytes per token), BDIA with gamma0 = 1/8 keeps 3 bits per element
    (64 * 3 / 8 = 24 bytes). Exact: every other byte cancels in the two-by-two difference."""
    pytest.importorskip("transformers")
    cm = _script("conversion_memory")
    monkeypatch.setitem(cm.SHAPES, "1b", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                              num_key_value_heads=2, vocab_size=300))
    assert cm.kept_per_layer("1b", "hf_ac", lengths=(16, 32)) == 256
    assert cm.kept_per_layer("1b", "bdia", lengths=(16, 32)) == 24


def test_reversible_step_computes_checkpointings_flops_without_its_early_stop():
    """The counts behind recompute_flops_*.md, on the tiny preset: the reversible backward evaluates each
    sub-function once (the FLOPs of checkpointing without its early stop), and
    checkpointing's early stop skips each block's FFN output projection (2 * d_ff * d FLOPs a token)."""
    rf = _script("recompute_flops")
    cfg = TransformerConfig.preset("tiny")
    L, S = 2, 64
    flops = {m: rf.count("tiny", L, S, m)["flops"] for m in
             ("standard", "full_ac", "full_ac:no_early_stop", "revnet_zero")}
    assert flops["revnet_zero"] == flops["full_ac:no_early_stop"]
    w_out = 2 * cfg.d_ff * cfg.d_model * S
    assert flops["full_ac:no_early_stop"] - flops["full_ac"] == L * w_out
    counts = {(d, s): rf.count("tiny", d, s, "standard") for d in (1, 2) for s in (32, 64)}
    f = rf.fit(counts, (1, 2), (32, 64), "flops", "quad")
    assert rf.at(f, L, S) == pytest.approx(flops["standard"], rel=1e-12)


def test_memory_breakdown_counts_what_is_alive():
    """The tracer behind the GPU breakdown logs: a tensor counts from its op until its last Python
    reference dies; views do not count twice."""
    mb = _script("memory_breakdown")
    tracer = mb.LiveTensors()
    with tracer:
        a = torch.ones(1000)            # 4000 bytes
        v = a.view(10, 100)             # a view: no new storage
        b = a * 2                       # 4000 more
        del b
        c = torch.zeros(250)            # 1000
    assert tracer.peak == 8000 and tracer.current == 5000
    del a
    assert tracer.current == 5000       # the view still holds a's storage
    del v, c
    assert tracer.current == 0


def test_suite_with_the_optimizer_stepped_in_backward(tiny):
    """optimizer='adamw_in_backward' runs the step through OptimizerInBackward, labels the rows, and
    leaves the model without hooks after (lr 0: the weights do not move)."""
    before = [p.detach().clone() for p in tiny.parameters()]
    rows = BenchmarkSuite(device="cpu", repeats=1, optimizer="adamw_in_backward").run(
        {"m": tiny}, [16], 1, modes=["revnet_zero"])
    assert [(r["status"], r["optimizer"]) for r in rows] == [("ok", "adamw_in_backward")]
    assert all(torch.equal(a, b) for a, b in zip(before, tiny.parameters()))
    tiny(torch.randint(0, 256, (1, 16))).loss.backward()
    assert all(p.grad is not None for p in tiny.parameters())   # hooks removed: .grad is kept again
    tiny.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="optimizer must be"):
        BenchmarkSuite(device="cpu", optimizer="sgd")
