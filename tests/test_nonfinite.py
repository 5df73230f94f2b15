"""Non-finite updates never reach the weights or a checkpoint: hyperparameters, NaN gradients with a
finite loss, fp16 overflow, checkpoints of NaN weights, "last good", rotation."""
import math

import pytest
import torch
from torch import nn

from revnet_zero.data import ByteTokenizer, PackedDataset
from revnet_zero.models import ReversibleGPT, TransformerConfig
from revnet_zero.training import Trainer, TrainingConfig, latest_checkpoint, load_checkpoint, save_checkpoint
from revnet_zero.training.checkpoint import last_good_checkpoint

pytest.importorskip("safetensors")

TEXT = "the quick brown fox jumps over the lazy dog; " * 40


def tiny(seed=0):
    torch.manual_seed(seed)
    return ReversibleGPT(TransformerConfig.preset("tiny", vocab_size=ByteTokenizer.vocab_size, max_seq_len=32))


def train_data():
    return PackedDataset.from_texts([TEXT], ByteTokenizer(), 32)


def fast(**kw):
    return {"progress": False, "batch_size": 4, "warmup_steps": 2, "lr": 3e-3, **kw}


class NaNGradientOnCall(nn.Module):
    """Adds ``where(c, sqrt(negative), 0)`` to the loss on forward call ``bad_call`` (or on every call:
    ``'every'``): the loss stays finite, the gradient of every head weight is NaN (0 * inf in sqrt's
    backward)."""

    def __init__(self, model, bad_call):
        super().__init__()
        self.model, self.bad_call, self.calls = model, bad_call, 0

    def forward(self, ids, labels=None):
        out = self.model(ids, labels=labels)
        self.calls += 1
        if self.bad_call == "every" or self.calls == self.bad_call:
            neg = -self.model.head.weight.square().sum() - 1.0
            out.loss = out.loss + torch.where(neg > 0, neg.sqrt(), torch.zeros_like(neg))
        return out


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("field, value", [
    ("lr", float("nan")), ("lr", float("inf")), ("weight_decay", float("nan")), ("weight_decay", -0.1),
    ("gradient_clip", float("nan")), ("gradient_clip", float("inf")), ("betas", (float("nan"), 0.95)),
    ("betas", (0.9, 1.0)), ("eps", float("nan")), ("eps", 0.0), ("min_lr_ratio", float("nan"))])
def test_non_finite_or_out_of_range_hyperparameters_are_refused(field, value):
    name = "betas" if field == "betas" else field
    with pytest.raises(ValueError, match=name):
        TrainingConfig(**{field: value})
    with pytest.raises(ValueError, match=name):
        Trainer(tiny(), **fast(**{field: value}))


def test_nan_gradient_with_finite_loss_is_not_applied_and_the_good_checkpoint_survives(tmp_path):
    """keep_checkpoints=1: the NaN step must neither be applied, nor saved, nor rotate step 2 away."""
    model = NaNGradientOnCall(tiny(), bad_call=3)
    trainer = Trainer(model, **fast(out_dir=str(tmp_path), save_every=2, keep_checkpoints=1))
    with pytest.raises(FloatingPointError) as info:
        trainer.train(train_dataset=train_data(), num_steps=4)
    message = str(info.value)
    assert "at step 3" in message and "model.head.weight" in message
    assert "Last good checkpoint:" in message and message.count("step-000002") == 1
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root).name == "step-000002" == last_good_checkpoint(root).name
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000002"]
    saved = NaNGradientOnCall(tiny(seed=7), bad_call=0)
    load_checkpoint(root, saved)
    now = weights(model)
    assert all(torch.equal(now[k], v) for k, v in saved.state_dict().items())  # the NaN step changed nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_drops_the_bad_step_and_counts_it(tmp_path):
    model = NaNGradientOnCall(tiny(), bad_call=2)
    trainer = Trainer(model, **fast(out_dir=str(tmp_path), log_every=1, on_nonfinite="skip"))
    before = {}

    def remember(module, args):
        if model.calls == 1:  # the second call's step is the bad one: its weights must survive it
            before.update(weights(model.model))
    model.register_forward_pre_hook(remember)
    summary = trainer.train(train_dataset=train_data(), num_steps=2)
    assert summary["step"] == 2 and summary["skipped_steps"] == 1
    assert [h.get("skipped_steps", 0) for h in trainer.history] == [0, 1]
    after = weights(model.model)
    assert all(torch.equal(after[k], before[k]) for k in before)  # step 2 applied nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_overflow_is_skipped_by_the_loss_scaler():
    """fp16: a step with Inf gradients is skipped and the scale halves, as GradScaler does; no error."""
    model = NaNGradientOnCall(tiny(), bad_call=2)
    trainer = Trainer(model, **fast(precision="fp16", log_every=1, device="cpu"))
    try:
        trainer.train(train_dataset=train_data(), num_steps=2)
    except RuntimeError as e:  # pragma: no cover - a CPU build without fp16 autocast
        pytest.skip(f"fp16 autocast unavailable on this CPU build: {e}")
    scales = [h["loss_scale"] for h in trainer.history]
    assert trainer.skipped_steps == 1 and scales[1] == scales[0] / 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_checkpoints_of_non_finite_weights_are_refused(tmp_path):
    model = tiny()
    trainer = Trainer(model, **fast(out_dir=str(tmp_path)))
    trainer.save()
    with torch.no_grad():
        model.blocks.blocks[0].coupling.f.norm.weight[3] = float("inf")
    with pytest.raises(FloatingPointError, match=r"non-finite weights in blocks\.blocks\.0\..*norm\.weight"):
        trainer.save(tmp_path / "other")
    assert not (tmp_path / "other").exists()
    with pytest.raises(FloatingPointError, match="non-finite values in"):
        save_checkpoint(tmp_path / "direct", 1, model, {"step": 1})
    assert not (tmp_path / "direct").exists()


def test_last_good_checkpoint_skips_a_damaged_one(tmp_path):
    model = tiny()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, {"step": step})
    weights_file = tmp_path / "step-000002" / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-10] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    assert latest_checkpoint(tmp_path).name == "step-000002"   # the pointer alone cannot tell
    assert last_good_checkpoint(tmp_path).name == "step-000001"


def test_a_healthy_run_skips_nothing():
    trainer = Trainer(tiny(), **fast())
    summary = trainer.train(train_dataset=train_data(), num_steps=2)
    assert summary["skipped_steps"] == 0 and math.isfinite(summary["loss"])


def test_a_non_finite_override_to_train_is_refused_before_any_step():
    trainer = Trainer(tiny(), **fast())
    before = weights(trainer.module)
    with pytest.raises(ValueError, match="gradient_clip must be a finite number, got nan"):
        trainer.train(train_dataset=train_data(), num_steps=1, gradient_clip=float("nan"))
    assert trainer.step == 0 and all(torch.equal(v, before[k]) for k, v in weights(trainer.module).items())


def test_fp16_gradients_that_stay_non_finite_whatever_the_scale_stop_the_run():
    """Every step's gradient is NaN: GradScaler would halve the scale forever; once it is below 1 the
    trainer stops (with on_nonfinite='raise'), as the NaN cannot be an overflow of the scaling."""
    model = NaNGradientOnCall(tiny(), bad_call="every")
    trainer = Trainer(model, **fast(precision="fp16", device="cpu", batch_size=1))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)  # skipped steps halve it: 4, 2, 1, 0.5
    with pytest.raises(FloatingPointError, match=r"at step 4; non-finite gradients in .*loss scale fell to 0.5"):
        trainer.train(train_dataset=train_data(), num_steps=10)
    assert trainer.skipped_steps == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
