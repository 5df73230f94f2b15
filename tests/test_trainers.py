"""A converted model under the trainers users already run: Hugging Face's ``Trainer`` (with its
flattening collator: packed documents) and TRL's ``SFTTrainer`` with its default arguments (packing
on, gradient checkpointing on), on CPU with a tiny Qwen2.

The check: the converted model trains exactly as ``bdia_reference`` (plain autograd of the same
forward) under the same trainer, seed and data -- the logged losses bitwise at the first step and to
1e-6 after it (one AdamW step apart, where the reference's gradients differ by a few ulps), the logged
gradient norms to 1e-6 -- and the batches really are packed (several documents per row, no attention
mask, ``position_ids`` restarting at each document).
"""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from revnet_zero.conversion import bdia_reference, convert_to_reversible  # noqa: E402

VOCAB = 101


def tiny_model():
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config)


def tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<pad>", "</s>"] + [f"w{i}" for i in range(2, VOCAB)]
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w2"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>")


def documents(n=8):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 14, (n,), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": [torch.randint(2, VOCAB, (k,), generator=g).tolist()
                                                     for k in lengths]})


def spy_inputs(model):
    """The keyword arguments of every call of ``model`` (shapes and a copy of position_ids)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append({"position_ids": kwargs.get("position_ids"), "attention_mask": kwargs.get("attention_mask")})
    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def logged(trainer):
    return [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]


def assert_packed(seen):
    assert seen
    for call in seen:
        pos = call["position_ids"]
        assert pos is not None and call["attention_mask"] is None
        assert (pos[:, 1:] == 0).any(), pos   # a document starts inside the row


def assert_same_training(a, b):
    assert len(a) == len(b) == 2
    assert a[0][0] == b[0][0]
    for (loss, norm), (ref_loss, ref_norm) in zip(a, b):
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss) and abs(norm - ref_norm) <= 1e-6 * ref_norm


def run_sft(model, tmp_path, **overrides):
    trl = pytest.importorskip("trl")
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, max_length=24,
                         report_to="none", use_cpu=True, logging_steps=1, save_strategy="no", **overrides)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=documents(), processing_class=tokenizer())
    seen, handle = spy_inputs(trainer.model)
    trainer.train()
    handle.remove()
    return logged(trainer), seen, args


@pytest.mark.slow   # ~20 s on 2 busy cores: two SFTTrainer runs
def test_sft_trainer_with_its_defaults(tmp_path):
    converted = convert_to_reversible(tiny_model(), verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, seen, args = run_sft(converted, tmp_path / "converted", packing=True)
    assert args.gradient_checkpointing   # TRL's default: accepted as a no-op, with one notice
    notices = [w for w in caught if "gradient_checkpointing_enable() ignored" in str(w.message)]
    assert len(notices) == 1
    assert not any(getattr(m, "gradient_checkpointing", False) for m in converted.modules())
    assert_packed(seen)
    # the reference is plain autograd: Hugging Face's checkpointing left off so nothing else differs
    want, _, _ = run_sft(bdia_reference(tiny_model()), tmp_path / "reference", packing=True,
                         gradient_checkpointing=False)
    assert_same_training(got, want)


def test_hugging_face_trainer_with_flattened_documents(tmp_path):
    def run(model, where):
        args = transformers.TrainingArguments(output_dir=str(where), max_steps=2, per_device_train_batch_size=2,
                                              report_to="none", use_cpu=True, logging_steps=1, save_strategy="no")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=documents(),
                                       data_collator=transformers.DataCollatorWithFlattening())
        seen, handle = spy_inputs(trainer.model)
        trainer.train()
        handle.remove()
        return logged(trainer), seen

    got, seen = run(convert_to_reversible(tiny_model(), verbose=False), tmp_path / "converted")
    assert_packed(seen)
    want, _ = run(bdia_reference(tiny_model()), tmp_path / "reference")
    assert_same_training(got, want)
