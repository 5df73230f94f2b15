"""The revnet-zero command: demo end to end, train from flags or a config file, bench, profile."""
import json
import re
import sys
import types

import pytest

pytest.importorskip("typer")
pytest.importorskip("safetensors")
pytest.importorskip("matplotlib")
from typer.testing import CliRunner  # noqa: E402

from revnet_zero.cli import app  # noqa: E402

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def summary_of(output: str) -> dict:
    """The JSON summary that train prints last (the progress bar shares the captured output)."""
    return json.loads(output[output.rindex('{"step"'):].strip())


def test_demo_runs_end_to_end_and_reversible_keeps_less(tmp_path):
    out = tmp_path / "demo"
    r = invoke("demo", "--steps", 5, "--layers", 2, "--d-model", 64, "--heads", 2, "--seq-len", 64,
               "--batch-size", 4, "--out-dir", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "bytes of tensors saved for backward" in r.output  # says which measure it used
    standard = float(re.search(r"standard training \(plain autograd\):\s+([\d.]+) MiB", r.output).group(1))
    reversible = float(re.search(r"reversible training \(recompute\):\s+([\d.]+) MiB", r.output).group(1))
    assert 0 < reversible < standard
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoints" / "step-000005" / "model.safetensors").exists()
    assert "Trained 5 steps" in r.output and "Sample" in r.output


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        (folder / "sub" / f"doc{i}.txt").write_text(f"document {i}: " + "some words to learn from. " * 30)
    (folder / "broken.txt").write_bytes(b"\xff\xfe\x00")
    return folder


def test_train_from_flags_then_resume(tmp_path, corpus):
    out = tmp_path / "run"
    common = ["train", "--data", corpus, "--seq-len", 32, "--batch-size", 2, "--set", "num_layers=1",
              "--set", "d_model=32", "--set", "num_heads=2", "--set", "num_kv_heads=2", "--out-dir", out,
              "--eval-every", 2, "--save-every", 2, "--device", "cpu"]
    r = invoke(*common, "--steps", 4)
    assert r.exit_code == 0, r.output
    assert "skipped 1 unusable" in r.output
    assert summary_of(r.output)["step"] == 4
    r = invoke(*common, "--steps", 6, "--resume")
    assert r.exit_code == 0, r.output
    summary = summary_of(r.output)
    assert summary["step"] == 6 and summary["steps_this_run"] == 2


def test_train_from_a_config_file_with_flags_winning(tmp_path, corpus):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"data": str(corpus), "seq_len": 32, "batch_size": 2, "steps": 50,
                               "model": {"num_layers": 1, "d_model": 32, "num_heads": 2, "num_kv_heads": 2},
                               "out_dir": str(tmp_path / "run"), "eval_fraction": 0, "device": "cpu"}))
    r = invoke("train", "--config", cfg, "--steps", 2)
    assert r.exit_code == 0, r.output
    assert summary_of(r.output)["step"] == 2


def test_train_reports_bad_input_without_a_traceback(tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"dataa": "x"}))
    r = invoke("train", "--config", cfg)
    assert r.exit_code == 1 and "unknown keys ['dataa']" in r.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    r = invoke("train", "--data", tmp_path / "empty")
    assert r.exit_code == 1 and "no usable text" in r.output and "Traceback" not in r.output


def test_bench_passes_its_arguments_to_the_benchmark_runner(monkeypatch):
    seen = []
    fake = types.ModuleType("revnet_zero.benchmarks")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "revnet_zero.benchmarks", fake)
    monkeypatch.setattr("revnet_zero.benchmarks", fake, raising=False)
    r = invoke("bench", "--model", "S", "--quick")
    assert r.exit_code == 0, r.output
    assert seen == [["--model", "S", "--quick"]]
    del fake.main
    r = invoke("bench")
    assert r.exit_code == 1 and "no main() runner" in r.output


def test_profile_prints_saved_bytes_per_block():
    r = invoke("profile", "--seq-len", 32, "--batch-size", 1, "--device", "cpu")
    assert r.exit_code == 0, r.output
    rows = {" ".join(line.split()[:-2]): [float(x) for x in line.split()[-2:]] for line in r.output.splitlines()
            if line.startswith(("block", "outside", "total"))}
    assert set(rows) == {"block 0", "block 1", "outside blocks", "total"}
    assert rows["total"][1] < rows["total"][0]              # reversible < standard
    assert rows["block 0"][1] == 0 < rows["block 0"][0]     # a reversible block that is not last keeps nothing
