"""``revnet_zero.hf``: the Hugging Face config and model around ``ReversibleGPT``; tiny models, nothing
downloaded.

Tolerances (float32): the Hugging Face wrapper runs the same modules as ``ReversibleGPT``, so its logits,
losses and greedy tokens are compared exactly (logits of a slice of positions: 1e-6, the head's matmul
on fewer rows rounds differently); the cached (decoding) path against the uncached forward is
different code for the same math (attention over cached keys vs one causal call): 1e-5 relative. LoRA
gradients, reversible ('recompute') vs plain autograd ('store'): 1e-6, as in test_models.py (inputs
rebuilt by subtraction are off by about one float32 rounding of the streams).
"""
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from revnet_zero.hf import RevNetZeroConfig, RevNetZeroForCausalLM  # noqa: E402
from revnet_zero.hf.modeling import CACHE_FIELD  # noqa: E402
from revnet_zero.models import ReversibleGPT, TransformerConfig  # noqa: E402

V = 61


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def tiny(**kw) -> RevNetZeroForCausalLM:
    """2 blocks, d = 40 (not a power of two), GQA 4/2 heads, vocab 61."""
    args = dict(vocab_size=V, num_layers=2, d_model=40, num_heads=4, num_kv_heads=2, d_ff=72, max_seq_len=64)
    torch.manual_seed(0)
    return RevNetZeroForCausalLM(RevNetZeroConfig(**{**args, **kw}))


def ids(B=2, S=13, seed=1):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- import and config

def test_core_imports_without_transformers_and_hf_says_how_to_install():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import revnet_zero, revnet_zero.models\n"
            "try:\n    import revnet_zero.hf\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    assert "pip install 'revnet-zero[hf]'" in out.stdout


def test_config_mirrors_transformer_config():
    tc = TransformerConfig.preset("tiny", stream_dtype=torch.bfloat16, tie_embeddings=True)
    cfg = RevNetZeroConfig.from_transformer_config(tc, bos_token_id=1)
    assert cfg.to_transformer_config() == tc
    assert cfg.stream_dtype == "bfloat16" and cfg.bos_token_id == 1 and cfg.model_type == "revnet_zero"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.tie_word_embeddings) == \
        (96, 2, 2, True)
    back = RevNetZeroConfig.from_dict(cfg.to_dict())
    assert back.to_transformer_config() == tc
    # fields left None are stored resolved; the standard names are accepted as keywords
    cfg = RevNetZeroConfig(hidden_size=96, num_heads=4, stream_dtype=None)
    assert (cfg.d_model, cfg.d_ff, cfg.num_kv_heads, cfg.stream_dtype) == (96, 256, 4, None)
    assert dataclasses.asdict(cfg.to_transformer_config()) == dataclasses.asdict(
        TransformerConfig(d_model=96, num_heads=4, stream_dtype=None))


def test_config_errors_quote_values():
    with pytest.raises(ValueError, match="d_model=90 must split into num_heads=4"):
        RevNetZeroConfig(d_model=90, num_heads=4)
    with pytest.raises(ValueError, match="stream_dtype must name a torch dtype.*'float33'"):
        RevNetZeroConfig(stream_dtype="float33")
    with pytest.raises(ValueError, match="both hidden_size=64 and d_model=96"):
        RevNetZeroConfig(hidden_size=64, d_model=96)


# ---------------------------------------------------------------- forward, init

def test_forward_is_reversible_gpt_forward():
    model = tiny()
    x = ids()
    gpt = ReversibleGPT(model.config.to_transformer_config())
    gpt.load_state_dict(model.model.state_dict())
    out, ref = model(x, labels=x), gpt(x, labels=x)
    assert out.logits is None and torch.equal(out.loss, ref.loss)       # training: loss only
    model.eval(), gpt.eval()
    out, ref = model(x), gpt(x)
    assert out.loss is None and torch.equal(out.logits, ref.logits)     # eval: logits
    last = model(x, logits_to_keep=1).logits
    assert last.shape == (2, 1, V) and rel(last, ref.logits[:, -1:]) < 1e-6   # a smaller matmul: other rounding


def test_fresh_weights_follow_reversible_lm_init():
    model = tiny(d_model=96, d_ff=256, num_layers=3)
    wo = torch.cat([b.coupling.f.wo.weight.flatten() for b in model.model.blocks.blocks])
    wq = torch.cat([b.coupling.f.wq.weight.flatten() for b in model.model.blocks.blocks])
    assert wo.std().item() == pytest.approx(0.02 / math.sqrt(6), rel=0.05)   # residual writes scaled by depth
    assert wq.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if "norm" in n)


# ---------------------------------------------------------------- generate, cache

def test_greedy_generate_equals_reversible_gpt_generate():
    model = tiny().eval()
    prompt = ids(B=3, S=7)
    ref = model.model.generate(prompt, max_new_tokens=12, temperature=0)
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, ref) and torch.equal(uncached, ref)


def test_cached_steps_match_full_forward():
    model = tiny().eval()
    x = ids(S=11)
    full = model(x).logits
    with torch.no_grad():
        out = model(x[:, :8], use_cache=True)
        logits = [out.logits]
        for t in range(8, 11):
            out = model(x[:, t:t + 1], past_key_values=getattr(out, CACHE_FIELD))
            logits.append(out.logits)
    assert getattr(out, CACHE_FIELD).get_seq_length() == 11
    assert rel(torch.cat(logits, dim=1), full) < 1e-5


def test_generate_feeds_one_new_token_per_step(monkeypatch):
    """generate() and the model share one cache (passed as ``cache`` from transformers 5.24, as
    ``past_key_values`` before): after the prompt each call gets one token and a cache that holds every
    position before it."""
    model = tiny().eval()
    seen, forward = [], RevNetZeroForCausalLM.forward

    def recording(self, input_ids, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((input_ids.shape[1], None if cache is None else cache.get_seq_length()))
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(RevNetZeroForCausalLM, "forward", recording)
    model.generate(ids(S=5), max_new_tokens=4, do_sample=False)
    assert [w for w, _ in seen] == [5, 1, 1, 1], seen
    assert [c for _, c in seen][1:] == [5, 6, 7], seen


def test_cached_decoding_refuses_padding_labels_and_static_caches():
    model = tiny().eval()
    x = ids(S=6)
    mask = torch.ones_like(x)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padding is not supported with the KV cache"):
        model.generate(x, attention_mask=mask, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="labels with a KV cache"):
        model(x, labels=x, use_cache=True)
    with pytest.raises(ValueError, match="exceed max_seq_len=64"):
        model.generate(x, max_new_tokens=60, do_sample=False)
    with pytest.raises(ValueError, match="static .* caches, which make 4-d masks, are not supported"):
        model.generate(x, max_new_tokens=2, do_sample=False, cache_implementation="static")


# ---------------------------------------------------------------- save / load

@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_round_trip_through_auto_classes(tmp_path, tie):
    model = tiny(tie_embeddings=tie, coupling="affine", stream_dtype=None).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "pytorch_model.bin").exists()
    assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path), RevNetZeroConfig)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, RevNetZeroForCausalLM) and not loaded.training
    assert loaded.config.to_transformer_config() == model.config.to_transformer_config()
    assert (loaded.model.head.weight is loaded.model.embed.weight) == tie
    x = ids()
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_weight_missing_from_checkpoint_is_initialised_like_reversible_lm(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = tiny(d_model=64, num_heads=4, d_ff=128)
    model.save_pretrained(tmp_path)
    path, key = str(tmp_path / "model.safetensors"), "model.blocks.blocks.1.coupling.f.wo.weight"
    weights = safetensors.load_file(path)
    del weights[key]
    safetensors.save_file(weights, path, metadata={"format": "pt"})
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {key}
    fresh = loaded.get_parameter(key)
    assert fresh.std().item() == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.1)   # residual write, 2 layers
    assert all(torch.equal(p, loaded.get_parameter(n)) for n, p in model.named_parameters() if n != key)


# ---------------------------------------------------------------- Trainer, peft

def test_hf_trainer_trains_a_few_steps(tmp_path):
    model = tiny()
    S = 24
    rows = [(torch.arange(S) * k + k) % V for k in range(1, 9)]           # 8 arithmetic sequences
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=15, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, learning_rate=1e-2, warmup_steps=0, logging_steps=1,
        save_strategy="no", disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 15 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0], losses
    assert trainer.evaluate()["eval_loss"] < losses[0]


def loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_trains_only_adapters_and_reversible_grads_are_exact():
    peft = pytest.importorskip("peft", reason="peft is not installed")
    model = peft.get_peft_model(tiny(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["wq", "wv"],
                                                        lora_dropout=0.0, task_type="CAUSAL_LM"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2          # 2 layers x (wq, wv) x (A, B)
    with torch.no_grad():                       # B starts at zero, which would zero A's gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    x = ids(S=17)
    loss, grads = loss_and_grads(model, x)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)   # frozen base
    model.get_base_model().model.blocks.set_policy("store")
    loss_ref, grads_ref = loss_and_grads(model, x)
    assert torch.equal(loss, loss_ref)
    for n in trainable:
        assert grads[n].abs().sum() > 0 and rel(grads[n], grads_ref[n]) < 1e-6, n
