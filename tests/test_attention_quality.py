"""The quality script's pieces at tiny sizes: the recall probe separates exact from windowed attention,
and a tiny LM run trains and reports."""
import torch

from revnet_zero.benchmarks import attention_quality as aq


def test_recall_probe_exact_recalls_and_window_cannot():
    r = aq.recall_probe(1024, 128, pairs=16)
    assert r["softmax (exact)"] >= 0.9               # sharp keys: exact softmax finds its pair
    assert r["sliding_window w=128"] <= 0.5          # every pair lies beyond the window: chance is 1/16
    assert set(r) == {"softmax (exact)", "sliding_window w=128", "hierarchical w=128 r=(16,64,256)",
                      "rational_fourier gaussian m=256", "rational_fourier cauchy m=256"}


def test_tiny_lm_run_trains_and_reports():
    torch.manual_seed(0)
    data = torch.randint(0, 200, (40, 33))
    r = aq.train_lm(dict(attention="sliding_window", attention_window=8), data[:32], data[32:], steps=4,
                    batch=4, eval_every=2, seq_len=33)
    assert [s for s, _ in r["curve"]] == [2, 4] and r["held_out_loss"] == r["curve"][-1][1]
    result = {"command": "x", "torch": "t", "date": "d", "lm": {"w": r}, "probe": {1024: {"a": 0.5}},
              "args": {"seq_len": 33, "steps": 4, "batch": 4, "probe_window": 8}}
    text = aq.report(result, False, "stem")
    assert "| w | " in text and "| a | 0.50 |" in text
