"""CPU smoke test of the JAX-vs-PyTorch long-context benchmark (the figures come from the GPU run)."""
import json

import pytest

pytest.importorskip("jax", reason="the [jax] extra (jax, flax, optax) is not installed")

from revnet_zero.benchmarks import jax_port


@pytest.mark.slow
def test_smoke_runs_every_row_in_its_own_process_and_writes_the_ratios(tmp_path):
    out = tmp_path / "jax_port.json"
    results = jax_port.main(["--smoke", "--seq-lens", "24", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    rows = results["rows"]
    assert [(r["run"], r["seq_len"]) for r in rows] == [(run, 24) for run in jax_port.RUNS]
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        assert r["step_s"] > 0 and len(r["step_times"]) == 1
    # the JAX runs start from the PyTorch model's weights: all three compute the same loss (fp32 on CPU)
    losses = [r["loss"] for r in rows]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0]), losses
    assert rows[0]["compiled_temp_gib"] > 0
    (ratio,) = results["ratios"]
    assert ratio["seq_len"] == 24 and ratio["time_vs_torch"] > 0
    assert ratio["peak_vs_torch"] is None   # no peak figure on CPU: none is invented


def test_ratios_pair_rows_of_one_length_and_skip_failed_ones():
    rows = [{"run": "jax_reversible", "seq_len": 8, "status": "ok", "step_s": 2.0, "peak_gib": 3.0},
            {"run": "torch", "seq_len": 8, "status": "ok", "step_s": 1.0, "peak_gib": 6.0},
            {"run": "jax_remat", "seq_len": 8, "status": "oom", "error": "RESOURCE_EXHAUSTED"}]
    assert jax_port.ratios(rows) == [{"seq_len": 8, "time_vs_torch": 2.0, "peak_vs_torch": 0.5,
                                      "peak_vs_remat": None}]
