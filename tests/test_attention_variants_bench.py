"""CPU smoke run of the GPU script for the attention variants and the single-stream headline."""
import json

import pytest

from revnet_zero.benchmarks import attention_variants as av


@pytest.mark.slow   # ~15 s of CPU: 40 tiny rows, each building its model's step
def test_gpu_script_runs_every_row_at_tiny_sizes(tmp_path):
    rows = av.main(["--out", str(tmp_path), "--smoke", "--max-repeats", "1", "--budget-s", "600"])
    assert {(r.status, r.note) for r in rows if r.status != "ok"} == set()
    assert {r.mode for r in rows if r.part == "headline"} == set(av.HEADLINE_MODES)
    assert {r.attention for r in rows if r.part == "variants"} == {*av.VARIANTS, "softmax"}
    assert all(r.step_s > 0 and r.tokens_per_s > 0 and len(r.times) == 1 for r in rows)
    stem = next(tmp_path.glob("attention_variants_smoke_*.json")).stem
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert len(data["rows"]) == len(rows) and data["env"]["torch"]
    assert (tmp_path / f"{stem}.md").read_text().count("\n| ") == len(rows) + 1


def test_rows_are_skipped_with_their_prediction_when_time_runs_out():
    done = [av.Row("variants", "sliding_window", "revnet_zero", 1024, status="ok", step_s=10.0)]
    row = av.Row("variants", "sliding_window", "revnet_zero", 4096)
    assert av.choose_repeats(row, done, left=1000) == 3 and row.predicted_s == 40.0   # linear in S
    assert av.choose_repeats(row, done, left=100) == 1
    assert av.choose_repeats(row, done, left=50) is None
    exact = [av.Row("variants", "softmax", "revnet_zero", 256 * 1024, status="ok", step_s=30.0)]
    assert av.predict(av.Row("variants", "softmax", "revnet_zero", 1024 * 1024), exact) == 30.0 * 16
