"""StabilityAnalyzer: finds an injected drift, switches that block only, reports gradients and statistics."""
import os

import pytest
import torch

from revnet_zero import ReversibleTransformer, TransformerConfig
from revnet_zero.utils import StabilityAnalyzer


def model_and_batch(blow_up: float | None):
    torch.manual_seed(0)
    m = ReversibleTransformer(TransformerConfig.preset("tiny", num_layers=3))
    if blow_up is not None:   # block 1's FFN output dwarfs the streams: y2 - G(y1) loses the digits of x2
        with torch.no_grad():
            m.blocks.blocks[1].coupling.g.w_out.weight.mul_(blow_up)
    return m, torch.randint(0, 256, (2, 33))


def test_injected_drift_is_found_and_only_that_block_is_switched(tmp_path):
    m, ids = model_and_batch(1e7)
    report = StabilityAnalyzer(m).analyze(ids, num_forward_passes=2, drift_bound=1e-4)
    drift = {b.name: b.drift_fp32 for b in report.blocks}
    # float32 streams: a healthy block rebuilds to ~1e-7 of the stream; the blown-up one (outputs
    # ~1e4 x its inputs) to ~5e-3
    assert drift["blocks.blocks.1"] > 1e-3
    assert drift["blocks.blocks.0"] < 1e-5 and drift["blocks.blocks.2"] < 1e-5
    assert report.switched_to_store == ["blocks.blocks.1"]
    assert [b.policy for b in m.blocks.blocks] == ["recompute", "store", "recompute"]
    assert report.max_drift_bf16 >= report.max_drift_fp32   # bf16 streams keep fewer digits
    assert report.max_grad_norm == max(b.grad_norm for b in report.blocks) > 0
    stats = report.activation_stats["blocks.blocks.1"]
    assert stats["max_abs"] > 100 * report.activation_stats["blocks.blocks.0"]["max_abs"]
    assert "switched to 'store': ['blocks.blocks.1']" in report.summary()
    report.plot(str(tmp_path / "stability.png"))
    assert os.path.getsize(tmp_path / "stability.png") > 1000


def test_healthy_model_switches_nothing_and_restores_training_mode():
    m, ids = model_and_batch(None)
    m.eval()
    report = StabilityAnalyzer(m).analyze(ids, drift_bound=1e-4, check_gradient_norm=False)
    assert report.switched_to_store == [] and report.max_drift_fp32 < 1e-5
    assert report.max_grad_norm is None and all(b.grad_norm is None for b in report.blocks)
    assert not m.training and all(b.policy == "recompute" for b in m.blocks.blocks)


def test_bad_arguments():
    m, ids = model_and_batch(None)
    a = StabilityAnalyzer(m)
    with pytest.raises(ValueError, match="needs a batch of real inputs"):
        a.analyze()
    with pytest.raises(ValueError, match="num_forward_passes must be a positive int, got 0"):
        a.analyze(ids, num_forward_passes=0)
    with pytest.raises(ValueError, match="bound_on must be 'fp32' or 'bf16', got 'fp8'"):
        a.analyze(ids, bound_on="fp8")
    with pytest.raises(ValueError, match="contains no ReversibleBlock"):
        StabilityAnalyzer(torch.nn.Linear(2, 2))
