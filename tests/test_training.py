"""The trainer: learning, bitwise resume, accumulation, precision, bad input, NaN, the front doors."""
import json
import math

import pytest
import torch

from revnet_zero.data import ByteTokenizer, PackedDataset
from revnet_zero.models import ReversibleGPT, TransformerConfig
from revnet_zero.training import (DistributedReversibleTrainer, LongContextTrainer, ReversibleAMPTrainer, Trainer,
                                  latest_checkpoint, lr_multiplier)

pytest.importorskip("safetensors")

TEXT = "the quick brown fox jumps over the lazy dog; " * 40


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return ReversibleGPT(TransformerConfig.preset("tiny", vocab_size=ByteTokenizer.vocab_size, max_seq_len=32,
                                                  **overrides))


def data(seq_len=32):
    return PackedDataset.from_texts([TEXT], ByteTokenizer(), seq_len).split(0.1)  # 50 + 6 sequences


def fast(**kw):
    """Trainer options for short CPU tests."""
    return {"progress": False, "batch_size": 4, "warmup_steps": 2, "lr": 3e-3, **kw}


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_loss_goes_down_and_eval_runs(tmp_path):
    train, val = data()
    trainer = Trainer(tiny(), **fast(out_dir=str(tmp_path), eval_every=10, log_every=5))
    summary = trainer.train(train_dataset=train, eval_dataset=val, num_steps=30)
    losses = [h["loss"] for h in trainer.history if "loss" in h]
    assert losses[-1] < losses[0] - 1.0
    assert summary["step"] == 30 and summary["eval_loss"] < 3.5
    assert trainer.evaluate(val) == trainer.evaluate(val) == summary["eval_loss"]  # same batches every time
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "peak_memory_bytes"} <= set(lines[0])
    assert [line["step"] for line in lines if "eval_loss" in line] == [10, 20, 30]
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000030"


class Interrupted(Exception):
    pass


def _interrupt_at(trainer, step):
    run = trainer._train_step

    def maybe_die(stream):
        if trainer.step == step:
            raise Interrupted
        return run(stream)
    trainer._train_step = maybe_die


@pytest.mark.parametrize("source", ["dataset", "loader"])
def test_resume_continues_bitwise_identically(tmp_path, source):
    """N steps straight == N/2 steps, a 'crash', then fresh objects resuming from the checkpoint.
    Dropout, accumulation, clipping and evaluation are on, so RNG, optimizer and data position all matter."""
    train, val = data()
    loader = [torch.stack([train[i], train[i + 1]]) for i in range(0, 12, 2)]  # no state_dict: resumes by skipping

    def run(model, out, interrupt=None, resume=False):
        trainer = Trainer(model, **fast(out_dir=str(out), save_every=3, eval_every=2,
                                        gradient_accumulation_steps=2, gradient_clip=0.5))
        if interrupt:
            _interrupt_at(trainer, interrupt)
        feed = {"train_dataset": train} if source == "dataset" else {"train_loader": loader}
        torch.manual_seed(1234)
        return trainer.train(**feed, eval_dataset=val, num_steps=6, resume=resume)

    straight = tiny(dropout=0.2)
    run(straight, tmp_path / "a")
    with pytest.raises(Interrupted):
        run(tiny(dropout=0.2), tmp_path / "b", interrupt=4)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-000003"
    resumed = tiny(seed=99, dropout=0.2)  # a new process: other weights, other RNG state
    torch.manual_seed(5)
    summary = run(resumed, tmp_path / "b", resume=True)
    assert summary["steps_this_run"] == 3
    a, b = params(straight), params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_one_big_batch():
    train, _ = data()
    big, small = tiny(), tiny()
    Trainer(big, **fast(batch_size=4)).train(train_dataset=train, num_steps=3)
    Trainer(small, **fast(batch_size=2, gradient_accumulation_steps=2)).train(train_dataset=train, num_steps=3)
    a, b = params(big), params(small)
    # the summed gradients differ by float rounding; Adam divides each by its own tiny running norm,
    # which turns that into ~1e-6 of the weights (lr is 3e-3): far below any step
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=2e-5) for k in a)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    train, _ = data()
    model = tiny()
    trainer = Trainer(model, **fast(out_dir=str(tmp_path), save_every=2))
    model.norm.register_forward_hook(lambda m, i, out: out * float("nan") if trainer.step >= 3 else out)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 4.*step-000002"):
        trainer.train(train_dataset=train, num_steps=10)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000002"
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step changed nothing


def test_token_ids_outside_the_vocabulary_are_reported():
    bad = PackedDataset(torch.full((64,), 300), 32)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 259\); got min 300, max 300"):
        Trainer(tiny(), **fast(batch_size=1)).train(train_dataset=bad, num_steps=1)


def test_sequences_longer_than_the_model_are_refused():
    train, _ = data(seq_len=64)
    with pytest.raises(ValueError, match=r"sequences have 64 tokens, more than max_length=32"):
        Trainer(tiny(), **fast()).train(train_dataset=train, num_steps=1)
    loader = [torch.zeros(1, 40, dtype=torch.long)]
    with pytest.raises(ValueError, match=r"S <= max_length=32, got shape \(1, 40\)"):
        Trainer(tiny(), **fast()).train(train_loader=loader, num_steps=1)


def test_steps_or_epochs_must_be_given_once():
    train, _ = data()
    trainer = Trainer(tiny(), **fast())
    with pytest.raises(ValueError, match="exactly one of num_epochs and num_steps"):
        trainer.train(train_dataset=train)
    with pytest.raises(ValueError, match="num_epochs needs data with len"):
        trainer.train(train_loader=iter([torch.zeros(1, 8, dtype=torch.long)]), num_epochs=1)
    with pytest.raises(TypeError, match="unknown arguments"):
        trainer.train(train_dataset=train, num_steps=1, use_magic=True)


def test_lr_warms_up_then_decays_by_cosine():
    m = [lr_multiplier(s, 101, 10, 0.1) for s in range(101)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(m[10:], m[11:]))
    assert m[-1] == pytest.approx(0.1) and m[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_long_context_trainer_takes_the_seed_arguments_and_refuses_what_it_lacks():
    train, val = data()
    trainer = LongContextTrainer(tiny(), max_length=32, gradient_accumulation_steps=2, **fast())
    summary = trainer.train(train_dataset=train, eval_dataset=val, num_epochs=1, batch_size=2,
                            memory_efficient_optimizer=True)
    assert summary["step"] == len(train) // 2 // 2
    assert trainer.optimizer.defaults["foreach"] is False
    with pytest.raises(ValueError, match="attention_window_size=8 and use_linear_attention_approximation=True"):
        LongContextTrainer(tiny(), max_length=32, use_linear_attention_approximation=True, attention_window_size=8)
    with pytest.raises(ValueError, match="max_length=262144 exceeds the model's max_seq_len=32"):
        LongContextTrainer(tiny(), max_length=262144)


@pytest.mark.parametrize("fp16", [True, False])
def test_amp_trainer_trains_in_fp16_with_loss_scaling_or_bf16(fp16):
    train, _ = data()
    loader = [torch.stack([train[i], train[i + 1]]) for i in range(0, 8, 2)]
    trainer = ReversibleAMPTrainer(tiny(), fp16=fp16, loss_scale="dynamic", keep_batchnorm_fp32=True,
                                   **fast(log_every=1))
    trainer.train(train_loader=loader, num_steps=4, gradient_clip=1.0)
    assert all(math.isfinite(h["loss"]) for h in trainer.history)
    assert ("loss_scale" in trainer.history[-1]) == fp16
    assert all(p.dtype == torch.float32 for p in trainer.module.parameters())


def test_amp_trainer_refuses_what_it_lacks():
    with pytest.raises(ValueError, match="loss_scale=128"):
        ReversibleAMPTrainer(tiny(), loss_scale=128)
    with pytest.raises(ValueError, match="keep_batchnorm_fp32=False"):
        ReversibleAMPTrainer(tiny(), keep_batchnorm_fp32=False)


def test_distributed_trainer_needs_torch_distributed_initialised():
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedReversibleTrainer(tiny(), sharding_strategy="fsdp",
                                     gradient_checkpointing_policy="nothing_saveable")
    with pytest.raises(ValueError, match="'zero3'"):
        DistributedReversibleTrainer(tiny(), sharding_strategy="zero3")
    with pytest.raises(ValueError, match="cpu_offload=True needs sharding_strategy='fsdp'"):
        DistributedReversibleTrainer(tiny(), sharding_strategy="ddp", cpu_offload=True)


def test_lists_of_sequences_train_and_evaluate_alike_and_the_run_is_saved_first(tmp_path):
    """The documented call: train_dataset and eval_dataset as lists of [S] tensors."""
    train, val = data()
    train_list, val_list = [train[i] for i in range(len(train))], [val[i] for i in range(len(val))]
    trainer = LongContextTrainer(tiny(), max_length=32, **fast(out_dir=str(tmp_path / "a")))
    summary = trainer.train(train_dataset=train_list, eval_dataset=val_list, num_steps=2)
    assert summary["checkpoint"].endswith("step-000002") and math.isfinite(summary["eval_loss"])
    batches = [torch.stack(val_list[i:i + 4]) for i in range(0, len(val_list), 4)]
    assert trainer.evaluate(val_list) == trainer.evaluate(eval_loader=batches) == summary["eval_loss"]
    broken = LongContextTrainer(tiny(), max_length=32, **fast(out_dir=str(tmp_path / "b")))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        broken.train(train_dataset=train_list, eval_dataset=[torch.full((32,), 999)], num_steps=2)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-000002"  # saved before evaluating


@pytest.mark.parametrize("kwargs,attention", [(dict(attention_window_size=8), "sliding_window"),
                                              (dict(use_linear_attention_approximation=True), "rational_fourier")])
def test_long_context_trainer_switches_attention_keeping_weights(kwargs, attention):
    from revnet_zero.layers.attention_variants import _VariantAttention
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="replaced exact attention with .* in 2 blocks"):
        trainer = LongContextTrainer(model, max_length=32, **kwargs, **fast())
    assert model.config.attention == attention and "replaced" in trainer.attention_change
    assert all(isinstance(b.coupling.f, _VariantAttention) for b in model.blocks.blocks)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    train, val = data()
    trainer.train(train_dataset=train, eval_dataset=val, num_epochs=1, batch_size=4)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.warns(UserWarning, match="already uses"):
        LongContextTrainer(model, max_length=32, **kwargs, **fast())
    other = dict(use_linear_attention_approximation=True) if "attention_window_size" in kwargs else \
        dict(attention_window_size=8)
    with pytest.raises(ValueError, match=f"the model uses attention='{attention}'"):
        LongContextTrainer(model, max_length=32, **other, **fast())


def test_resuming_with_another_kind_of_data_is_refused(tmp_path):
    train, _ = data()
    loader = [torch.stack([train[i], train[i + 1]]) for i in range(0, 8, 2)]
    Trainer(tiny(), **fast(out_dir=str(tmp_path))).train(train_loader=loader, num_steps=2)
    with pytest.raises(ValueError, match=r"data position .* does not fit this run's Batches .*same kind of data"):
        Trainer(tiny(), **fast(out_dir=str(tmp_path))).train(train_dataset=train, num_steps=4, resume=True)
