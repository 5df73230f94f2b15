"""The attention variants inside the reversible model: the engine stays exact, kept memory stays
depth-independent, greedy decoding with each variant's cache equals recomputing the prefix, and the
Hugging Face config carries the choice through save/load."""
import pytest
import torch

from helpers import rel_err, saved_bytes
from revnet_zero import ReversibleTransformer, TransformerConfig

VARIANTS = {
    "sliding_window": dict(attention="sliding_window", attention_window=7),
    "hierarchical": dict(attention="hierarchical", local_window=6, compression_ratios=(2, 6), hierarchy_levels=2),
    "rational_fourier": dict(attention="rational_fourier", rf_num_features=16),
    "rf_cauchy_learnable": dict(attention="rational_fourier", rf_kernel="cauchy", rf_num_features=16,
                                rf_learnable=True),
}


def _model(name, **kw):
    torch.manual_seed(0)
    return ReversibleTransformer(TransformerConfig.preset("tiny", d_model=32, num_heads=4, num_kv_heads=2,
                                                          **VARIANTS[name], **kw))


def _grads(model, ids):
    model.zero_grad()
    model(ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_reversible_engine_exact_with_each_variant(name):
    # fp32: the reversible backward rebuilds inputs by subtraction; differences vs plain autograd are
    # rounding of the rebuilt streams (~1e-7 relative), so 1e-6
    model = _model(name)
    ids = torch.randint(0, 256, (2, 41))
    got = _grads(model, ids)
    model.blocks.set_policy("store")
    want = _grads(model, ids)
    assert got.keys() == want.keys()
    worst = max(rel_err(got[n], want[n]) for n in want)
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("name", ["sliding_window", "hierarchical", "rational_fourier"])
def test_kept_memory_is_depth_independent(name):
    ids = torch.randint(0, 256, (1, 48))

    def kept(layers, policy="recompute"):
        model = _model(name, num_layers=layers)
        model.blocks.set_policy(policy)
        return saved_bytes(lambda: model(ids).loss)[0]
    two, eight = kept(2), kept(8)
    assert abs(eight - two) < 0.1 * two, (two, eight)
    assert kept(8, "store") > 3 * eight     # the counter sees per-layer activations when they are kept


@pytest.mark.parametrize("name", ["sliding_window", "hierarchical"])
def test_kept_attention_policies_are_refused(name):
    model = _model(name)
    model.blocks.set_policy("store_attention")
    with pytest.raises(ValueError, match="use the 'recompute'"):
        model(torch.randint(0, 256, (1, 20))).loss.backward()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_decoding_with_cache_equals_recomputing_the_prefix(name):
    model = _model(name).eval()
    prompt = torch.randint(0, 256, (2, 13))
    got = model.generate(prompt, max_new_tokens=24, temperature=0)
    want = prompt
    for _ in range(24):
        logits = model(want, return_logits=True).logits[:, -1]
        want = torch.cat([want, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, want)
    # and the cached states equal the full forward's (a stronger check than equal argmaxes)
    caches = [b.coupling.f.new_cache(40) for b in model.blocks.blocks]
    steps = [model.cached_hidden_states(want[:, :13], caches)]
    steps += [model.cached_hidden_states(want[:, i:i + 1], caches) for i in range(13, want.shape[1])]
    full = model(want, return_logits=True).last_hidden_state
    assert rel_err(torch.cat(steps, 1), full) <= 1e-5


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hf_round_trip(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    from revnet_zero.hf import RevNetZeroConfig, RevNetZeroForCausalLM
    cfg = TransformerConfig.preset("tiny", d_model=32, num_heads=4, num_kv_heads=2, **VARIANTS[name])
    torch.manual_seed(0)
    model = RevNetZeroForCausalLM(RevNetZeroConfig.from_transformer_config(cfg)).eval()
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.to_transformer_config() == cfg
    ids = torch.randint(0, 256, (2, 30))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    # Hugging Face generate (DynamicCache: all keys) equals the model's own fixed-size caches
    out = loaded.generate(ids[:, :9], max_new_tokens=10, do_sample=False)
    assert torch.equal(out, loaded.model.generate(ids[:, :9], max_new_tokens=10, temperature=0))
