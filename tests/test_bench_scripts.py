"""The benchmark harness runs as modules: ``python -m revnet_zero.benchmarks.run`` (or ``revnet-zero
bench``) and ``python -m benchmarks.<name>`` from the repository root; no script edits ``sys.path`` or is
loaded by its file path."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")


def test_there_are_scripts():
    assert "conversion_memory" in SCRIPTS and "recompute_flops" in SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_as_a_module_and_has_a_main(name):
    source = (ROOT / "benchmarks" / f"{name}.py").read_text()
    assert "sys.path" not in source and "spec_from_file_location" not in source
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(getattr(module, "main", None)), f"benchmarks/{name}.py has no main()"


def test_package_code_loads_no_script_by_path():
    for path in (ROOT / "revnet_zero").rglob("*.py"):
        text = path.read_text()
        assert "sys.path.insert" not in text and "spec_from_file_location" not in text, path


def test_runner_help_runs_as_a_module_outside_the_repository(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "revnet_zero.benchmarks.run", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--modes" in done.stdout and "--lengths" in done.stdout
    assert "RuntimeWarning" not in done.stderr   # the package must not import the module it runs
