"""CPU smoke test of ``python -m revnet_zero.benchmarks.kernels`` at tiny sizes: every section runs and
writes its rows (on a CPU the Triton kernels and Liger's ops do not run: only the references and the
eager / torch paths, which is what the rows must say)."""
import json

import pytest


@pytest.mark.slow
def test_kernel_benchmark_runs_every_section_at_tiny_sizes(tmp_path):
    pytest.importorskip("transformers")
    from revnet_zero.benchmarks import kernels as bench
    code = bench.main(["--tiny", "--device", "cpu", "--repeats", "1", "--convert-lengths", "16",
                       "--model-lengths", "16", "--model-modes", "standard,revnet_zero", "--out", str(tmp_path)])
    assert code == 0
    (js,), (md,) = tmp_path.glob("kernels_*.json"), tmp_path.glob("kernels_*.md")
    rows = json.loads(js.read_text())
    assert all(r["status"] == "ok" for r in rows)
    micro = {(r["op"].split(" S=")[0], r["impl"]) for r in rows if r["section"] == "micro"}
    assert ("grid update_forward", "eager") in micro and ("affine separate_vjp", "eager") in micro
    assert not any(impl in ("triton", "liger", "compiled") for _, impl in micro)   # none of those on a CPU
    convert = {(r["mode"], r["grid_step"]) for r in rows if r["section"] == "convert"}
    assert convert == {("hf_ac", None), ("bdia", "auto")}
    assert {(r["mode"], r["kernels"]) for r in rows if r["section"] == "model_s"} == {("standard", "torch"),
                                                                                      ("revnet_zero", "torch")}
    assert all(r["hbm_fraction"] > 0 for r in rows if r["section"] == "micro")
    text = md.read_text()
    assert "| grid update_forward S=64 | eager |" in text and "## convert" in text and "## model_s" in text


def test_kernel_benchmark_refuses_an_unknown_section(capsys):
    from revnet_zero.benchmarks import kernels as bench
    with pytest.raises(SystemExit):
        bench.main(["--sections", "micro,nope", "--device", "cpu"])
    assert "unknown sections ['nope']" in capsys.readouterr().err
