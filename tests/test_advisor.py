"""OptimizationAdvisor (its plan fits when run), CommonPitfalls (each triggers and does not), OptimalConfigs."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from helpers import MLP, ShiftCoupling
from torch import nn

from revnet_zero import (
    AdditiveCoupling,
    ReversibleBlock,
    ReversibleSequence,
    ReversibleTransformer,
    TransformerConfig,
)
from revnet_zero.configs import OptimalConfigs
from revnet_zero.configs.optimal import PRESETS, TABLES, derive_presets
from revnet_zero.memory import MemoryProfiler
from revnet_zero.memory.scheduler import device_budget, plan
from revnet_zero.training import TrainingConfig
from revnet_zero.utils import CommonPitfalls, OptimizationAdvisor
from revnet_zero.utils.advisor import saved_step_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**kw):
    torch.manual_seed(0)
    return ReversibleTransformer(TransformerConfig.preset("tiny", num_layers=4, **kw))


def test_advisor_plan_fits_when_run():
    model, target = tiny(), 128
    probe = OptimizationAdvisor(model, target_seq_length=target, memory_budget=2**40, policies=("store", "recompute"))
    prof = probe.profile_at(target)
    least, most = (plan(prof, 2**62, (p,)).predicted_peak for p in ("recompute", "store"))
    budget = (least + most) // 2   # room for some stored blocks, not all: a mixed plan
    adv = OptimizationAdvisor(model, target_seq_length=target, memory_budget=budget, policies=("store", "recompute"))
    recs = {r.category: r for r in adv.analyze()}
    policies = recs["memory_policy"].numbers["policies"]
    assert set(policies) == {"store", "recompute"}
    ids = torch.randint(0, 256, (1, target))
    measured = saved_step_bytes(model, ids, policies) + adv._weights_bytes()
    # CPU: the bytes a step saves for backward, measured at the target, against the prediction
    # extrapolated from the two probe lengths: within budget, and the prediction is not loose by > 25%
    assert measured <= adv.plan.predicted_peak <= budget
    assert measured >= 0.75 * adv.plan.predicted_peak
    # the linear fit reproduces a profile measured directly at the target
    direct = MemoryProfiler(model, ("store", "recompute")).profile(ids)
    for got, want in zip(prof.costs, direct.costs):
        assert got["store"].kept_bytes == pytest.approx(want["store"].kept_bytes, rel=0.02)
    longest = recs["sequence_length"].numbers["longest_seq_len"]
    assert longest > target and recs["batch_size"].numbers["largest_batch"] >= 1
    assert all(b.policy == "recompute" for b in model.blocks.blocks)   # analyze changes nothing
    out = adv.apply_recommendations(model)
    assert out is model and [b.policy for b in model.blocks.blocks] == policies
    assert len(adv.changes) == policies.count("store") and "recompute -> store" in adv.changes[0]


def test_advisor_says_when_nothing_fits_and_rejects_bad_arguments():
    model = tiny()
    adv = OptimizationAdvisor(model, target_seq_length=256, memory_budget=1000, policies=("store", "recompute"))
    recs = {r.category: r for r in adv.analyze()}
    assert "no policy plan fits" in recs["memory_policy"].suggestion
    assert "does NOT fit" in recs["sequence_length"].expected_gain
    with pytest.raises(ValueError, match="target_seq_length must be a positive int, got 0"):
        OptimizationAdvisor(model, target_seq_length=0)
    with pytest.raises(ValueError, match="policies must include 'recompute'"):
        OptimizationAdvisor(model, target_seq_length=8, policies=("store",))
    with pytest.raises(ValueError, match="needs a .config with vocab_size"):
        OptimizationAdvisor(nn.Sequential(ReversibleSequence([AdditiveCoupling(MLP(4), MLP(4))])), 8)


# --- CommonPitfalls: each check fires on a model made to have the problem, and not on a clean one ---

def names(model, cfg=None):
    return [p.name for p in CommonPitfalls().check(model, cfg)]


def test_clean_model_has_no_pitfalls():
    assert names(tiny(), TrainingConfig(batch_size=2, max_length=256)) == []


def test_batchnorm_in_block():
    bn = nn.BatchNorm1d(3, track_running_stats=False)
    block = ReversibleBlock(AdditiveCoupling(nn.Sequential(nn.Linear(8, 8), bn)))
    assert "batchnorm_in_block" not in names(block)
    block.coupling.f[1].track_running_stats = True   # switched on after the engine's construction-time check
    found = CommonPitfalls().check(block)
    assert [p.name for p in found] == ["batchnorm_in_block"] and "BatchNorm1d" in found[0].description


def test_dropout_without_rng_capture():
    def block(p, keep):
        return ReversibleBlock(AdditiveCoupling(MLP(6, p=p), MLP(6)), preserve_rng_state=keep)
    assert "dropout_without_rng_capture" in names(block(0.1, False))
    assert "dropout_without_rng_capture" not in names(block(0.1, True))
    assert "dropout_without_rng_capture" not in names(block(0.0, False))


def test_half_precision_streams():
    assert "half_precision_streams" in names(tiny(stream_dtype=torch.bfloat16))
    assert "half_precision_streams" not in names(tiny())


def test_custom_coupling_whose_inverse_fails():
    class Wrong(ShiftCoupling):
        def inverse(self, y1, y2):
            return y1, y2 + self.transform(y1)   # sign error

    torch.manual_seed(0)
    found = CommonPitfalls().check(ReversibleSequence([Wrong(8)]))
    assert [p.name for p in found] == ["coupling_not_invertible"] and "Wrong.inverse" in found[0].description
    assert names(ReversibleSequence([ShiftCoupling(8)])) == []


def test_sequence_length_against_model_and_ffn_tile():
    model = tiny(ffn_chunk_size=None)
    assert "sequence_longer_than_model" in names(model, TrainingConfig(max_length=1024))   # max_seq_len 512
    assert "sequence_longer_than_model" not in names(model, TrainingConfig(max_length=512))
    huge = SimpleNamespace(seq_len=2**24, batch_size=64)   # 64 x 16M x 512 FFN inputs > 2^31
    assert "ffn_tile_too_large" in names(model, huge)
    assert "ffn_tile_too_large" not in names(tiny(ffn_chunk_size=4096), huge)


def test_scheduler_budget_above_free_memory():
    model = tiny()
    free = device_budget("cpu")
    assert "budget_above_free_memory" in names(model, SimpleNamespace(memory_budget=4 * free + 2**40))
    assert "budget_above_free_memory" not in names(model, SimpleNamespace(memory_budget=2**20))


# --- OptimalConfigs ---

def test_presets_equal_what_the_committed_tables_give():
    for (size, hw, regime), rows in PRESETS.items():
        tables = {src: json.load(open(os.path.join(ROOT, src))) for src in TABLES[hw]}
        assert derive_presets(tables) == rows


def test_get_config_names_its_table_and_refuses_the_unknown():
    cfg = OptimalConfigs.get_config(model_size="S", context_length=100_000, hardware="H100_80GB",
                                    training_regime="pre-training")
    assert cfg.context_length == 131072 and cfg.policies == {"store": 11, "offload_attention": 13}
    assert os.path.exists(os.path.join(ROOT, cfg.source)) and cfg.recompute_granularity == "block"
    assert cfg.transformer_config().max_seq_len == 131072
    with pytest.raises(ValueError, match=r"hardware='A100_40GB'; known: \['H100_80GB'\]"):
        OptimalConfigs.get_config(model_size="S", context_length=8192, hardware="A100_40GB")
    with pytest.raises(ValueError, match="model_size='7B'; known"):
        OptimalConfigs.get_config(model_size="7B", context_length=8192, hardware="H100_80GB")
    with pytest.raises(ValueError, match="longer than any measured on H100_80GB .longest 262,144"):
        OptimalConfigs.get_config(model_size="S", context_length=2**20, hardware="H100_80GB")
