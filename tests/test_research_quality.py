"""The quality comparison script runs end to end at tiny sizes and writes its table (CPU smoke test)."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_research_quality_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("research_quality",
                                                  os.path.join(ROOT, "benchmarks", "research_quality.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--smoke", "--out", str(tmp_path)])
    assert [r["model"] for r in rows] == ["additive", "rotation", "orthogonal", "continuous"]
    params = [r["params"] for r in rows]
    assert max(params) / min(params) < 1.02   # equal parameters, to within the FFN width's step
    assert all(r["held_out_loss"] < 6.0 for r in rows)   # below uniform over 259 bytes (5.56) + noise
    (md,) = [f for f in os.listdir(tmp_path) if f.endswith(".md")]
    table = open(tmp_path / md).read()
    assert all(f"| {r['model']} |" in table for r in rows)
    data = json.load(open(tmp_path / md.replace(".md", ".json")))
    assert data["rows"][0]["curve"] and data["meta"]["args"]["steps"] == 3
