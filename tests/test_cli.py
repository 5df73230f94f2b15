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
    import revnet_zero.benchmarks.modes  # noqa: F401 - the real mode list checks names
    seen = []
    fake = types.ModuleType("revnet_zero.benchmarks")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "revnet_zero.benchmarks", fake)
    monkeypatch.setattr("revnet_zero.benchmarks", fake, raising=False)
    r = invoke("bench", "--config", "S", "--modes", "revnet_zero", "--quick")
    assert r.exit_code == 0, r.output
    assert seen == [["--config", "S", "--modes", "revnet_zero", "--quick"]]
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


# ------------------------------------------------------------ every failure: one error: line, no traceback

def assert_error_line(r, *fragments):
    """Exit status 1, no traceback, and the last line is an ``error:`` line holding each fragment."""
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.exit_code, r.exception, r.output)
    assert "Traceback" not in r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(f in last for f in fragments), r.output


def small_train(corpus, out, *extra):
    return invoke("train", "--data", corpus, "--seq-len", 32, "--batch-size", 2, "--set", "num_layers=1",
                  "--set", "d_model=32", "--set", "num_heads=2", "--set", "num_kv_heads=2", "--out-dir", out,
                  "--steps", 2, "--eval-fraction", 0, "--save-every", 1, *extra)


def test_an_unreadable_data_file_is_an_error_line(tmp_path, corpus, monkeypatch):
    import errno
    from pathlib import Path
    target = corpus / "sub" / "doc0.txt"
    read = Path.read_bytes

    def refuse(self):
        if self == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return read(self)
    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert_error_line(small_train(target, tmp_path / "run", "--device", "cpu"), "Permission denied", str(target))


@pytest.mark.parametrize("device, fragment", [("warp9", "unknown device 'warp9'"),
                                              ("cuda", "device 'cuda': no cuda device is available"),
                                              ("cpu:x", "unknown device 'cpu:x'")])
def test_a_device_this_machine_lacks_is_an_error_line(tmp_path, corpus, device, fragment):
    import torch
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_error_line(small_train(corpus, tmp_path / "run", "--device", device), fragment)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_bad_sizes_and_an_output_folder_that_cannot_be_made_are_error_lines(tmp_path, corpus):
    assert_error_line(small_train(corpus, tmp_path / "run", "--batch-size", 0), "batch_size must be >= 1, got 0")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_error_line(small_train(corpus, blocker / "run", "--device", "cpu"),
                      f"cannot write to the output folder {blocker / 'run'}")
    r = invoke("demo", "--steps", 1, "--out-dir", blocker / "demo", "--device", "cpu")
    assert_error_line(r, "cannot write to the output folder")
    assert_error_line(invoke("profile", "--batch-size", 0, "--device", "cpu"), "--batch-size")
    assert_error_line(invoke("demo", "--batch-size", 0, "--out-dir", tmp_path / "d", "--device", "cpu"),
                      "batch_size must be an integer >= 1, got 0")
    assert_error_line(invoke("demo", "--steps", 0, "--out-dir", tmp_path / "d", "--device", "cpu"),
                      "steps must be an integer >= 1, got 0")


@pytest.mark.parametrize("failure", ["oserror", "torch_zip_writer"])
def test_a_full_disk_while_writing_trainer_state_is_an_error_line(tmp_path, corpus, monkeypatch, failure):
    import errno

    from revnet_zero.training import checkpoint as ckpt

    def disk_full(obj, f):
        if failure == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    r = small_train(corpus, tmp_path / "run", "--device", "cpu")
    expected = "No space left on device" if failure == "oserror" else "file write failed ("
    assert_error_line(r, "cannot write", "trainer.pt", expected)
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()  # nothing half-written is called a checkpoint


def test_bench_without_a_task_runs_the_default_sweep_under_its_own_name(monkeypatch):
    import revnet_zero.benchmarks.modes  # noqa: F401 - the real mode list checks names below
    seen = []
    fake = types.ModuleType("revnet_zero.benchmarks")
    fake.main = lambda argv: seen.append((argv, sys.argv[0])) or 0
    monkeypatch.setitem(sys.modules, "revnet_zero.benchmarks", fake)
    monkeypatch.setattr("revnet_zero.benchmarks", fake, raising=False)
    r = runner.invoke(app, ["bench", "--config", "tiny"], prog_name="revnet-zero")
    assert r.exit_code == 0, r.output
    assert seen == [(["--config", "tiny", "--modes", "standard,full_ac,revnet_zero"], "revnet-zero bench")]
    assert "no task given" in r.output
    r = runner.invoke(app, ["bench", "--modes", "standard,warp_drive"], prog_name="revnet-zero")
    assert_error_line(r, "unknown benchmark mode 'warp_drive'")
    r = runner.invoke(app, ["bench", "--max-context=revnet_zero,nope"], prog_name="revnet-zero")
    assert_error_line(r, "unknown benchmark mode 'nope'")
    assert len(seen) == 1  # neither bad call reached the runner


@pytest.mark.parametrize("command", ["demo", "train", "profile", "bench"])
def test_each_usage_line_names_its_subcommand(command):
    r = runner.invoke(app, [command, "--help"], prog_name="revnet-zero")
    assert r.exit_code == 0, r.output
    assert re.search(rf"^usage: revnet-zero {command}\b", r.output, flags=re.I | re.M), r.output[:300]
    if command != "bench":  # (bench prints the benchmark runner's own help, which that module owns)
        assert not re.search(r"DESIGN\.md|BENCHMARKS\.md|shared/|seed doc", r.output), r.output


def test_a_config_whose_model_entry_is_not_a_mapping_names_it(tmp_path):
    # {"model": 3} used to end as "error: 'int' object is not a mapping"
    cfg = tmp_path / "bad_model.json"
    cfg.write_text(json.dumps({"model": 3}))
    r = invoke("train", "--config", cfg, "--data", tmp_path)
    assert r.exit_code == 1 and "'model' must be a mapping" in r.output and "got 3" in r.output
