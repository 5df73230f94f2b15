"""Every tested family (revnet_zero.conversion.families) through the conversion, from tiny random configs
of the family's own config class (2 layers, d=64, 19 tokens; no downloads).

Tolerances, as in tests/test_conversion.py:
* eval: atol 1e-5 asked, and in fact bitwise (eval runs the original layers).
* training against ``bdia_reference`` (plain autograd of the same quantised forward): losses bitwise,
  gradients relative error <= 1e-6 in fp32 (the same ops in the same order; the reversible backward
  sums the update's two gradient paths in another order, a few ulps).
* the lean RMSNorms' gradients against autograd of the module: relative 1e-6 (fp32 rows; an analytic
  backward against the decomposed ops), outputs bitwise.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from revnet_zero.conversion import bdia_reference, convert_from_reversible, convert_to_reversible  # noqa: E402
from revnet_zero.conversion.bdia import BDIALayer  # noqa: E402
from revnet_zero.conversion.families import FAMILIES  # noqa: E402
from revnet_zero.conversion.rmsnorm import lean_rmsnorm  # noqa: E402

VOCAB = 101
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=0, eos_token_id=0,
              attention_dropout=0.1)   # dropout on: the recompute must redraw the same masks
MOE = dict(output_router_logits=True, router_aux_loss_coef=0.5, num_experts_per_tok=2)
# (config class, model class, the family's own options, and the same with those options off)
SPECS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, None),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16), None),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8), dict(sliding_window=None)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                    layer_types=["sliding_attention", "full_attention"]),
               dict(head_dim=16, sliding_window=8, attn_logit_softcapping=None, final_logit_softcapping=None,
                    layer_types=["full_attention", "full_attention"])),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
                    dict(head_dim=16, sliding_window=8, layer_types=["full_attention", "full_attention"])),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(resid_pdrop=0.1), None),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=16, num_experts=4, moe_intermediate_size=32, **MOE), None),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, sliding_window=8, **MOE),
                dict(num_local_experts=4, sliding_window=None, **MOE)),
}
NEW = [f for f in SPECS]   # GPT-2 and Llama: tests/test_conversion.py
OPTIONS = [f for f in SPECS if SPECS[f][3] is not None]
MOES = ["qwen3_moe", "mixtral"]


def build(family, options=True, seed=0, dropout=0.1):
    config_cls, model_cls, own, off = SPECS[family]
    config = getattr(transformers, config_cls)(**{**COMMON, "attention_dropout": dropout}, **(own if options else off))
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config)


def ids(batch=2, length=19, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def train_step(model, x, seed=5, which="loss"):
    """``which`` of one training step ('loss' or 'aux_loss') and every gradient (same seed: same signs, dropout)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=x, labels=x)
    getattr(out, which).backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def norms_in_layers(model):
    return [m for layer in model.model.layers for m in layer.modules() if type(m).__name__.endswith("RMSNorm")]


def test_every_family_in_the_table_is_tested_here():
    assert set(FAMILIES) == set(SPECS) | {"gpt2", "llama"}


@pytest.mark.parametrize("family", NEW)
def test_eval_is_the_original(family):
    original = build(family).eval()
    converted = convert_to_reversible(original, verbose=False)
    x = ids()
    with torch.no_grad():
        a, b = original(input_ids=x, labels=x), converted(input_ids=x, labels=x)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    report = converted.reversible_report
    assert report.family == family and report.reversible == [0, 1] and not report.checkpointed
    assert report.gap_max_abs == 0.0
    # every RMSNorm of the layers got the lean backward (the table's formulas cover every family)
    assert report.lean_norms == len(norms_in_layers(original)) > 0


@pytest.mark.parametrize("family", NEW)
def test_training_gradients_equal_the_reference_and_rebuild_bitwise(family):
    original = build(family)
    converted = convert_to_reversible(original, verbose=False)
    reference = bdia_reference(original)
    seen = {}
    hooks = [m.layer.register_forward_pre_hook(lambda mod, args, i=m.index: seen.setdefault(i, []).append(
        args[0].detach().clone())) for m in converted.modules() if isinstance(m, BDIALayer)]
    x = ids()
    loss, grads = train_step(converted, x)
    for h in hooks:
        h.remove()
    ref_loss, ref_grads = train_step(reference, x)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    assert len(grads) == len([p for p in original.parameters() if p.requires_grad])
    worst = max(rel_err(grads[n], ref_grads[n]) for n in grads)
    assert worst <= 1e-6, worst
    # every layer ran twice (forward, backward's recompute) on the same input bits
    assert sorted(seen) == [0, 1] and all(len(v) == 2 and torch.equal(*v) for v in seen.values())


@pytest.mark.parametrize("family", OPTIONS)
def test_the_familys_attention_options_are_kept_in_training_and_eval(family):
    """Sliding windows and soft-capping act in the converted model: with them switched off (same
    weights) its training loss and eval logits change, while with them on eval equals the original."""
    on, off = build(family), build(family, options=False)
    off.load_state_dict(on.state_dict())
    x = ids(length=19)   # longer than the window of 8
    losses, logits = [], []
    for model in (on, off):
        converted = convert_to_reversible(model, verbose=False)
        losses.append(train_step(converted, x)[0])
        with torch.no_grad():
            logits.append(converted.eval()(input_ids=x).logits)
    assert not torch.allclose(losses[0], losses[1], atol=1e-4)
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)
    with torch.no_grad():
        assert torch.equal(on.eval()(input_ids=x).logits, logits[0])


@pytest.mark.parametrize("family", MOES)
def test_moe_load_balancing_loss_gradient_reaches_every_layer(family):
    """The auxiliary loss alone, differentiated: its gradient flows through the router logits that the
    converted layers return as extra outputs (conversion/recorded.py) to the earlier layers' weights
    and the embeddings, as plain autograd's does; the recompute makes the same routing decisions."""
    original = build(family)
    converted, reference = convert_to_reversible(original, verbose=False), bdia_reference(original)
    routed = []
    gates = [m for m in converted.modules() if type(m).__name__.endswith(("TopKRouter", "Router"))]
    assert len(gates) == 2
    hooks = [g.register_forward_hook(lambda mod, args, out: routed.append(out[2].clone())) for g in gates]
    x = ids()
    _, grads = train_step(converted, x, which="aux_loss")
    for h in hooks:
        h.remove()
    _, ref_grads = train_step(reference, x, which="aux_loss")
    # the last layer's experts do not reach any router: autograd gives them no gradient, the
    # reversible backward zeros (the gradient of the layer's output, which the loss does not use)
    extra = set(grads) - set(ref_grads)
    assert extra and all(".1.layer.mlp.experts." in n and not grads[n].any() for n in extra), extra
    assert set(ref_grads) <= set(grads)
    grads = {n: grads[n] for n in ref_grads}
    assert any("embed_tokens" in n for n in grads) and any("layers.0.layer.self_attn" in n for n in grads)
    worst = max(rel_err(grads[n], ref_grads[n]) for n in grads)
    assert worst <= 1e-6, worst
    # forward: layer 0, layer 1; backward's recompute: layer 1, layer 0 -- the same experts chosen
    assert len(routed) == 4
    assert torch.equal(routed[0], routed[3]) and torch.equal(routed[1], routed[2])
    # eval reports the same auxiliary loss as the original model
    with torch.no_grad():
        assert torch.equal(original.eval()(input_ids=x, labels=x).aux_loss,
                           converted.eval()(input_ids=x, labels=x).aux_loss)


def packed_grads(converted, batches) -> dict:
    """Gradients of ``sum(logits * w)`` over ``batches`` of ``((input_ids, position_ids), w)``."""
    converted.zero_grad(set_to_none=True)
    for (x, pos), w in batches:
        torch.manual_seed(6)
        (converted(input_ids=x, position_ids=pos, use_cache=False).logits * w).sum().backward()
    return {n: p.grad.clone() for n, p in converted.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma2", "qwen3_moe"])
def test_packed_documents_do_not_see_each_other(family):
    """Two documents in one row, ``position_ids`` restarting at the second and no attention mask (what
    packing collators give): Hugging Face builds a block-diagonal causal mask from the positions
    (SDPA, or eager for Gemma 2's soft-capping), and the converted layers receive it unchanged, so
    each document's logits and gradients are those of the document run alone. Training at batch 1 with
    the same seed draws the same signs in both runs, so a loss that is a sum over positions splits
    into the documents' losses exactly. Tolerances: eval atol 1e-5; gradients relative 1e-5 (a masked
    softmax over the row against one over the document alone sums in another order: 1e-6 measured)."""
    converted = convert_to_reversible(build(family, dropout=0.0), verbose=False)   # same masks both ways
    docs = [ids(batch=1, length=7, seed=3), ids(batch=1, length=12, seed=4)]
    packed = torch.cat(docs, 1)
    position_ids = torch.cat([torch.arange(7), torch.arange(12)])[None]
    weights = torch.randn(1, 19, VOCAB, generator=torch.Generator().manual_seed(5))
    # use_cache=False: with a cache Hugging Face does not read documents from the positions (trainers set it)
    with torch.no_grad():
        together = converted.eval()(input_ids=packed, position_ids=position_ids, use_cache=False).logits
        alone = torch.cat([converted(input_ids=d, use_cache=False).logits for d in docs], 1)
        crossing = converted(input_ids=packed, use_cache=False).logits   # no document boundary
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(crossing, alone, atol=1e-3)
    converted.train()
    for p in converted.parameters():
        p.requires_grad_(True)

    g_packed = packed_grads(converted, [((packed, position_ids), weights)])
    g_alone = packed_grads(converted, [((docs[0], None), weights[:, :7]), ((docs[1], None), weights[:, 7:])])
    assert g_packed.keys() == g_alone.keys()
    worst = max(rel_err(g_packed[n], g_alone[n]) for n in g_alone)
    assert worst <= 1e-5, worst


def test_two_stream_couplings_refuse_recorded_outputs_in_training():
    """'additive'/'affine' would leave the load-balancing loss without a gradient: refused, not silent."""
    converted = convert_to_reversible(build("qwen3_moe"), coupling="additive", verbose=False).train()
    with pytest.raises(ValueError, match="output_router_logits.*use coupling='bdia'"):
        converted(input_ids=ids(), labels=ids())
    converted.config.output_router_logits = False
    converted(input_ids=ids(), labels=ids()).loss.backward()   # without recording it trains


@pytest.mark.parametrize("family", NEW)
def test_round_trip_saves_a_plain_model(family, tmp_path):
    original = build(family)
    converted = convert_to_reversible(original, verbose=False)
    opt = torch.optim.SGD(converted.parameters(), lr=0.1)
    train_step(converted, ids())
    opt.step()
    plain = convert_from_reversible(converted)
    plain.save_pretrained(tmp_path)
    loaded = type(original).from_pretrained(tmp_path).eval()
    assert all(type(a) is type(b) for a, b in zip(loaded.model.layers, original.model.layers))
    x = ids(seed=7)
    with torch.no_grad():
        tuned = converted.eval()(input_ids=x).logits
        assert not torch.allclose(tuned, original.eval()(input_ids=x).logits, atol=1e-3)  # it did train
        assert torch.equal(loaded(input_ids=x).logits, tuned)


@pytest.mark.parametrize("family", NEW)
def test_peft_lora(family):
    peft = pytest.importorskip("peft")
    original = build(family)
    config = dict(r=4, target_modules=["o_proj", "down_proj"] if family not in MOES else ["o_proj"],
                  lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(1)
    converted = peft.get_peft_model(convert_to_reversible(original, verbose=False), peft.LoraConfig(**config))
    torch.manual_seed(1)
    reference = peft.get_peft_model(bdia_reference(original), peft.LoraConfig(**config))
    loss, grads = train_step(converted, ids())
    ref_loss, ref_grads = train_step(reference, ids())
    assert grads and all("lora_" in n for n in grads)
    assert torch.equal(loss, ref_loss)
    assert max(rel_err(grads[n], ref_grads[n]) for n in grads) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", NEW)
def test_lean_rmsnorm_is_each_familys_own(family, dtype):
    """Every RMSNorm class of every family: output bit for bit, gradients to fp32 rounding."""
    classes = {type(m): m for m in norms_in_layers(build(family))}
    assert classes
    for norm in classes.values():
        plain = copy.deepcopy(norm).train()
        with torch.no_grad():
            plain.weight.uniform_(-0.5, 1.5)
        lean = copy.deepcopy(plain)
        assert lean_rmsnorm(lean), type(norm).__name__
        width = plain.weight.shape[0]
        x = torch.randn(2, 19, width, dtype=dtype, generator=torch.Generator().manual_seed(2)).requires_grad_()
        d = torch.randn(2, 19, width, generator=torch.Generator().manual_seed(3)).to(dtype)
        got = []
        for m in (plain, lean):
            y = m(x)
            got.append((y, torch.autograd.grad(y, [x, m.weight], d)))
        (y0, g0), (y1, g1) = got
        assert torch.equal(y0, y1), type(norm).__name__
        assert rel_err(g1[0], g0[0]) <= 1e-6 and rel_err(g1[1], g0[1]) <= 1e-6, type(norm).__name__


def test_a_norm_of_another_formula_keeps_its_own_backward():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class ScaledRMSNorm(LlamaRMSNorm):    # a name not in the table: its math may differ
        def forward(self, x):
            return 2 * super().forward(x)

    norm = ScaledRMSNorm(8)
    assert not lean_rmsnorm(norm) and "forward" not in norm.__dict__


def test_an_untested_family_is_refused_with_the_list():
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    model = transformers.OPTForCausalLM(config)
    with pytest.raises(ValueError, match=r"model_type 'opt'\) is not a tested family; tested: GPT-2 \(gpt2\).*"
                                         r"Qwen3-MoE \(qwen3_moe\).*Pass untested=True"):
        convert_to_reversible(model, verbose=False)
    with pytest.raises(TypeError, match="untested must be a bool, got str"):
        convert_to_reversible(model, untested="yes")


def test_untested_true_converts_and_says_so(capsys):
    config = transformers.OlmoConfig(**{k: v for k, v in COMMON.items() if k != "attention_dropout"})
    torch.manual_seed(0)
    model = transformers.OlmoForCausalLM(config)
    with pytest.raises(ValueError, match="model_type 'olmo'"):
        convert_to_reversible(model, verbose=False)
    converted = convert_to_reversible(model, untested=True)
    assert "(not a tested family)" in capsys.readouterr().out
    assert converted.reversible_report.reversible == [0, 1]
    assert converted.reversible_report.gap_max_abs == 0.0


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_lean_rmsnorm_tiles_and_partial_gradients_change_nothing(family, monkeypatch):
    """Several row tiles (tiles of 3 rows, 38 rows) and asking for one gradient at a time give the very
    numbers of one tile and both gradients: each row's gradient and the weight's sum do not depend on the
    tiling (the weight's sum only through float32 addition order, checked to 1e-6)."""
    import revnet_zero.conversion.rmsnorm as rms
    norm = copy.deepcopy(next(iter(norms_in_layers(build(family))))).train()
    with torch.no_grad():
        norm.weight.uniform_(-0.5, 1.5)
    assert lean_rmsnorm(norm)
    width = norm.weight.shape[0]
    x = torch.randn(2, 19, width, generator=torch.Generator().manual_seed(2)).requires_grad_()
    d = torch.randn(2, 19, width, generator=torch.Generator().manual_seed(3))

    def grads(wrt):
        return torch.autograd.grad(norm(x), wrt, d)
    dx, dw = grads([x, norm.weight])
    monkeypatch.setattr(rms, "ROWS_ELEMENTS", 3 * width)
    dx_tiled, dw_tiled = grads([x, norm.weight])
    assert torch.equal(dx_tiled, dx) and rel_err(dw_tiled, dw) <= 1e-6
    assert torch.equal(grads([x])[0], dx_tiled) and torch.equal(grads([norm.weight])[0], dw_tiled)
