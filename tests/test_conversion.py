"""Pretrained Hugging Face models made reversible (revnet_zero.conversion), on tiny local configs.

Tolerances:
* eval / no_grad, 'bdia': atol 1e-5 (the documented conversion check); the converted layers *are* the original
  ones in eval, so the outputs are in fact bitwise equal, and the tests say so.
* training, 'bdia', against ``bdia_reference`` (plain autograd of the same quantised forward, with
  straight-through rounding): relative error <= 1e-6 in fp32. The reference computes the same
  fp32 ops in the same order and holds the grid streams exactly in float64, so in practice the
  losses are bitwise equal and the gradients agree to the last bit or within a few ulps.
* rebuilt activations: bitwise (``torch.equal``) on the int64 grid.
* 'additive'/'affine' against the engine's own plain-autograd policy ('store'): relative error
  <= 1e-5, since their inverse subtracts in floating point and 'affine' divides by its scale.
"""
import contextlib
import copy
import inspect
import warnings
import weakref

import pytest
import torch
from helpers import saved_bytes
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (GPT2Config, GPT2LMHeadModel, GPT2Model, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, LlamaModel)

from revnet_zero.conversion import (bdia_reference, convert_from_reversible,  # noqa: E402
                                    convert_to_reversible)
from revnet_zero.conversion import bdia as bdia_module  # noqa: E402
from revnet_zero.conversion import offload as offload_module  # noqa: E402
from revnet_zero.conversion import peft_compat  # noqa: E402
from revnet_zero.conversion.grid import (from_grid, gamma_step, gamma_unstep, pack_bits, residual_update, to_grid,  # noqa: E402
                                         unpack_bits)

VOCAB = 101


def gpt2_config(layers=3, dropout=0.1):
    return GPT2Config(n_layer=layers, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=512, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)


def llama_config(layers=3, dropout=0.1):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0,
                       eos_token_id=0, pad_token_id=0, attention_dropout=dropout)


BUILDERS = {
    "GPT2Model": lambda: GPT2Model(gpt2_config()),
    "GPT2LMHeadModel": lambda: GPT2LMHeadModel(gpt2_config()),
    "LlamaModel": lambda: LlamaModel(llama_config()),
    "LlamaForCausalLM": lambda: LlamaForCausalLM(llama_config()),
}


# the KV cache's keyword: 'cache' from transformers 5.24, 'past_key_values' before
CACHE_KW = "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"


def ids(batch=2, length=19, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def main_output(out):
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def train_step(model, x, seed=5, labels=True):
    """Loss and every parameter gradient of one training-mode step (same seed: same signs and dropout)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=x, labels=x) if labels else model(input_ids=x)
    loss = out.loss if labels else main_output(out).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def layers_of(model):
    base = model.base_model
    return base.h if hasattr(base, "h") else base.layers


@contextlib.contextmanager
def layer_inputs(model):
    """Each BDIA layer's input as the pretrained layer receives it, per layer index: in a training step
    its forward's, then its recompute's in the backward. The floats the layer sees, wherever they were
    made (eagerly, or by the compiled grid step on the GPU)."""
    seen = {}
    hooks = [m.layer.register_forward_pre_hook(
                 lambda mod, args, i=m.index: seen.setdefault(i, []).append(args[0].detach().clone()))
             for m in model.modules() if isinstance(m, bdia_module.BDIALayer)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def assert_rebuilt_bitwise(seen, layers):
    """Every layer ran twice (forward, recompute) on the same bits."""
    assert sorted(seen) == list(range(layers)), sorted(seen)
    for i, xs in seen.items():
        assert len(xs) == 2, (i, len(xs))
        assert torch.equal(xs[0], xs[1]), (i, (xs[0] != xs[1]).sum().item(), xs[0].numel())


# ---------------------------------------------------------------- eval: the original model, exactly

@pytest.mark.parametrize("name", list(BUILDERS))
def test_eval_outputs_equal_the_original(name):
    torch.manual_seed(0)
    original = BUILDERS[name]().eval()
    x = ids(length=23)
    converted = convert_to_reversible(original, checkpoint_segments=4)  # the documented call, coupling left out
    with torch.no_grad():
        a = original(input_ids=x, output_hidden_states=True)
        b = converted(input_ids=x, output_hidden_states=True)
    assert torch.allclose(main_output(a), main_output(b), atol=1e-5)
    assert torch.equal(main_output(a), main_output(b))
    assert len(a.hidden_states) == len(b.hidden_states) == 4
    assert all(torch.equal(u, v) for u, v in zip(a.hidden_states, b.hidden_states))
    assert type(b) is type(a)
    assert converted.reversible_report.gap_max_abs == 0.0
    if name.endswith(("LMHeadModel", "CausalLM")):
        with torch.no_grad():
            la, lb = original(input_ids=x, labels=x).loss, converted(input_ids=x, labels=x).loss
        assert torch.equal(la, lb)


def test_no_grad_in_train_mode_is_the_original_too():
    torch.manual_seed(0)
    original = GPT2Model(gpt2_config(dropout=0.0))
    converted = convert_to_reversible(original, verbose=False).train()
    with torch.no_grad():
        assert torch.equal(original.train()(input_ids=ids()).last_hidden_state,
                           converted(input_ids=ids()).last_hidden_state)


def test_generate_with_kv_cache_matches():
    torch.manual_seed(0)
    original = GPT2LMHeadModel(gpt2_config()).eval()
    converted = convert_to_reversible(original, verbose=False)
    x = ids(batch=1, length=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(original.generate(x, **kw), converted.generate(x, **kw))


# ---------------------------------------------------------------- training: exact gradients

@pytest.mark.parametrize("batch", [1, 3])   # batch 1: one sign per layer, gamma a float (see Signs)
@pytest.mark.parametrize("gamma0", [1 / 2, 1 / 4, 1 / 8])
@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_bdia_gradients_equal_plain_autograd_reference(name, gamma0, batch):
    torch.manual_seed(0)
    original = BUILDERS[name]()  # dropout 0.1: the recompute must redraw the same masks
    converted = convert_to_reversible(original, gamma0=gamma0, verbose=False)
    reference = bdia_reference(original, gamma0=gamma0)
    x = ids(batch=batch)
    loss, grads = train_step(converted, x)
    ref_loss, ref_grads = train_step(reference, x)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(original.parameters()))
    worst = max(rel_err(grads[n], ref_grads[n]) for n in grads)
    assert worst <= 1e-6, worst
    # the training forward is BDIA, not the original: with gamma != 0 the loss moves
    original.train()
    torch.manual_seed(5)
    assert not torch.equal(original(input_ids=x, labels=x).loss, loss)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_common_sign_update_is_the_per_sample_one(dtype, device):
    """With one sign for the whole batch, ``γ`` is a Python float and the update runs as two ``add``s
    with ``alpha`` (``(y + γ·y) - 2γ·x``): the same bits as the per-sample tensor form, for every
    ``m``, sign and dtype, values and gradients."""
    g = torch.Generator().manual_seed(0)
    y = (torch.randn(2, 257, 33, generator=g) * 10 ** torch.randint(-3, 4, (2, 257, 1), generator=g)).to(device, dtype)
    x = (torch.randn(2, 257, 33, generator=g) * 5).to(device, dtype)
    dout = torch.randn(2, 257, 33, generator=g).to(device, dtype)
    for m in (1, 2, 3):
        for sign in (1, -1):
            signs = bdia_module.Signs(torch.full((2,), sign, device=device), None)
            results = []
            for gamma in (bdia_module.gammas(signs, m, x), bdia_module.gammas(signs._replace(common=sign), m, x)):
                yg, xg = y.clone().requires_grad_(), x.clone().requires_grad_()
                b = residual_update(yg, xg, gamma)
                results.append((b, *torch.autograd.grad(b, [yg, xg], dout)))
            assert isinstance(gamma, float)
            assert all(torch.equal(t, f) for t, f in zip(*results)), (m, sign)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_signs_come_from_the_cpu_generator_and_reach_the_device(device):
    """``draw_signs``: the CPU generator's draw, on ``device``; ``common`` set exactly when all agree."""
    for batch in (1, 2, 64):
        torch.manual_seed(batch)
        signs = bdia_module.draw_signs(batch, torch.device(device))
        torch.manual_seed(batch)
        expected = torch.randint(0, 2, (batch,)) * 2 - 1
        assert signs.dev.device.type == device and torch.equal(signs.dev.cpu(), expected)
        agree = bool((expected == expected[0]).all())
        assert signs.common == (int(expected[0]) if agree else None), (batch, signs.common)
    assert signs.common is None   # 64 samples: mixed (all equal has probability 2^-63)


def test_common_sign_grid_step_is_the_per_sample_one():
    g = torch.Generator().manual_seed(0)
    X = torch.randint(-2 ** 60, 2 ** 60, (3, 7, 5), generator=g)
    for m in (1, 2, 3):
        for sign in (1, -1):
            signs = torch.full((3,), sign)
            A, low = gamma_step(X, signs, m)
            A1, low1 = gamma_step(X, signs, m, common=sign)
            assert torch.equal(A, A1) and torch.equal(low, low1)
            assert torch.equal(gamma_unstep(A1, low1, signs, m, common=sign), X)


@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_bdia_at_batch_one_takes_the_common_sign_path_with_the_same_result(name, monkeypatch):
    """Batch 1 (every long-context run): the signs are common, ``γ`` a float. The same step with the
    per-sample tensor path forced gives the same loss and gradients, bitwise."""
    torch.manual_seed(0)
    converted = convert_to_reversible(BUILDERS[name](), verbose=False)
    x = ids(batch=1)
    seen, draw = [], bdia_module.draw_signs
    monkeypatch.setattr(bdia_module, "draw_signs", lambda *a: seen.append(draw(*a)) or seen[-1])
    common = train_step(converted, x)
    assert seen and all(s.common in (1, -1) for s in seen)
    monkeypatch.setattr(bdia_module, "draw_signs", lambda *a: draw(*a)._replace(common=None))
    per_sample = train_step(converted, x)
    assert torch.equal(common[0], per_sample[0])
    assert all(torch.equal(common[1][n], per_sample[1][n]) for n in common[1])


def test_backward_twice_with_retained_graph():
    """The run's last pair is saved, the rest rebuilt into new tensors: a retained graph walks again."""
    torch.manual_seed(0)
    converted = convert_to_reversible(GPT2LMHeadModel(gpt2_config()), verbose=False).train()
    loss = converted(input_ids=ids(), labels=ids()).loss
    params = list(converted.parameters())
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_bdia_gradients_under_bf16_autocast():
    torch.manual_seed(0)
    original = LlamaForCausalLM(llama_config(dropout=0.0))
    converted = convert_to_reversible(original, verbose=False)
    reference = bdia_reference(original)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = train_step(converted, ids())
        ref_loss, ref_grads = train_step(reference, ids())
    assert torch.equal(loss, ref_loss)
    assert max(rel_err(grads[n], ref_grads[n]) for n in grads) <= 1e-6


def test_rebuilt_activations_are_bitwise_the_forward_ones(monkeypatch):
    """Record every grid tensor the Function turns into floats: in forward, X_0 and each layer's output
    X_{k+1}; in backward, each layer's rebuilt input X_k. Embeddings are scaled up so that the grid
    integers exceed 2^24 (where fp32 no longer holds them exactly)."""
    torch.manual_seed(0)
    original = GPT2LMHeadModel(gpt2_config(layers=5))
    with torch.no_grad():
        original.transformer.wte.weight.mul_(300)
    converted = convert_to_reversible(original, gamma0=1 / 8, verbose=False)
    seen = []
    real = bdia_module.from_grid

    def recording(X, dtype):
        seen.append(X.clone())
        return real(X, dtype)

    from revnet_zero.conversion import grid
    monkeypatch.setattr(bdia_module, "from_grid", recording)
    monkeypatch.setattr(grid, "from_grid", recording)   # the step's own output (update_forward)
    with layer_inputs(converted) as inputs:
        train_step(converted, ids())
    forward, backward = seen[:6], seen[6:]  # X_0..X_5, then X_4..X_0
    assert len(backward) == 5
    assert max(X.abs().max().item() for X in forward) > 2 ** 24
    for k, X in zip(range(4, -1, -1), backward):
        assert torch.equal(X, forward[k]), k
    assert_rebuilt_bitwise(inputs, 5)   # and the floats the layers ran on (the GPU tests' check)
    inputs[2][1] = inputs[2][1].nextafter(torch.tensor(float("inf")))   # which a one-ulp change fails
    with pytest.raises(AssertionError):
        assert_rebuilt_bitwise(inputs, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (SDPA's CUDA back ends)")
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_bdia_on_cuda(name, autocast, monkeypatch):
    """On the GPU, SDPA picks flash / memory-efficient / cuDNN kernels by dtype and requires_grad: the
    forward runs the layer as the recompute does, so the rebuild stays bitwise. Gradients may differ
    from the reference by the GPU's nondeterministic backward sums (atomics): fp32 1e-5, bf16 1e-2."""
    torch.manual_seed(0)
    original = BUILDERS[name]().cuda()
    converted = convert_to_reversible(original, verbose=False)
    reference = bdia_reference(original)
    x = ids(2, 256).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        with layer_inputs(converted) as seen:
            loss, grads = train_step(converted, x)
        ref_loss, ref_grads = train_step(reference, x)
    assert_rebuilt_bitwise(seen, 3)
    assert torch.equal(loss, ref_loss)
    assert max(rel_err(grads[n], ref_grads[n]) for n in grads) <= (1e-2 if autocast else 1e-5)
    with torch.no_grad():
        original.eval(), converted.eval()
        assert torch.equal(original(input_ids=x).logits, converted(input_ids=x).logits)


@pytest.mark.slow   # ~36 inductor compiles (m x dtype x sign form, forward and backward): about a minute on CPU
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_compiled_update_step_is_the_eager_one(device):
    """The compiled BDIA update + grid step (torch.compile; the CUDA default, compiled for the CPU's
    back end too) gives the eager bits, forward (X_next, packed bits, max |b|, the float output, which
    is eager from_grid in both since inductor on CUDA rounds int64 to bf16 otherwise in ~1 element in 2^17) and
    backward (X_prev rebuilt exactly), for m = 1..3, bf16 and fp32, one sign for the batch (γ a float,
    either sign) or one per sample (γ a tensor), and a size whose bits do not fill whole bytes. Many
    graphs in one GridStep: one lambda closing over m used to make m symbolic at its second value (which
    torch 2.11 on the GPU failed to trace) and to pass Dynamo's recompile limit of 8; each (step, m) now
    has its own function. A fallback to eager warns, which fails this test."""
    from revnet_zero.conversion import grid
    compiled = grid.GridStep("compiled", devices=("cuda", "cpu"))
    g = torch.Generator().manual_seed(0)
    for m in (1, 2, 3):
        for dtype in (torch.bfloat16, torch.float32):
            for common in (1, -1, None):
                S, D = (31, 7) if common is None else (64, 16)
                signs = bdia_module.Signs(torch.tensor([1, -1] if common is None else [common, common],
                                                       device=device), common)
                scale = 10 ** torch.randint(-3, 4, (2, S, 1), generator=g)   # values over seven decades
                y = (torch.randn(2, S, D, generator=g) * scale).to(device, dtype)
                x = (torch.randn(2, S, D, generator=g) * 5).to(device, dtype)
                X_prev = torch.randint(-2 ** 40, 2 ** 40, (2, S, D), generator=g).to(device)
                runs = []
                for step in (None, compiled):
                    assert step is None or step.kind(y) == "compiled"
                    with warnings.catch_warnings():
                        warnings.simplefilter("error", RuntimeWarning)
                        fwd = grid.update_forward(y, x, X_prev.clone(), signs, m, step=step)
                        back = grid.update_backward(y, x, fwd[0].clone(), fwd[1], signs, m, step=step)
                    runs.append((*fwd, back))
                names = ("X_next", "packed bits", "max |b|", "float output", "X_prev rebuilt")
                differ = {n: (e != f).sum().item() for n, e, f in zip(names, *runs) if not torch.equal(e, f)}
                where = (m, dtype, common)
                assert not differ, (where, differ)   # elements that differ, per output
                assert torch.equal(runs[1][-1], X_prev), where
    assert compiled.failed is None


@pytest.mark.parametrize("offload", [False, True])
def test_bdia_training_with_the_compiled_grid_step_changes_no_bit(monkeypatch, offload):
    """The compiled step inside real training (forward and backward): the same loss and gradients,
    bitwise, as the eager step. With offload the eager steps run (in place, for memory), so nothing
    is compiled. Compiled for the CPU here (the model's GridStep told to run there); CUDA is where it
    is meant to run."""
    from revnet_zero.conversion import grid
    torch.manual_seed(0)
    original = LlamaForCausalLM(llama_config(dropout=0.0))
    x = ids()
    results, calls, run = [], [], grid.GridStep.run
    monkeypatch.setattr(grid.GridStep, "run", lambda self, kind, fn, *a: (calls.append(fn.__name__),
                                                                            run(self, kind, fn, *a))[1])
    for mode in ("eager", "compiled"):
        converted = convert_to_reversible(original, verbose=False, offload=offload, grid_step=mode)
        steps = {id(m.grid_step): m.grid_step for m in converted.modules() if isinstance(m, bdia_module.BDIALayer)}
        assert len(steps) == 1   # one per model, shared by its layers
        step = next(iter(steps.values()))
        assert step.mode == mode and converted.reversible_report.grid_step == mode
        step.devices = ("cuda", "cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)   # a fallback to eager fails the test
            results.append(train_step(converted, x))
        assert step.failed is None
    (loss, grads), (fused_loss, fused_grads) = results
    layers = llama_config().num_hidden_layers   # the first layer of a run has no grid step
    expected = [] if offload else ["_update_forward", "_update_backward"] * (layers - 1)
    assert sorted(calls) == sorted(expected), calls
    assert torch.equal(loss, fused_loss)
    assert all(torch.equal(grads[n], fused_grads[n]) for n in grads)


def test_a_failed_grid_step_falls_back_for_that_model_only(monkeypatch):
    """A compile failure warns once and turns that model's step eager (same bits); another converted
    model keeps its own choice: no process-wide switch."""
    torch.manual_seed(0)
    original = LlamaForCausalLM(llama_config(dropout=0.0))
    x = ids()
    broken, healthy = (convert_to_reversible(original, verbose=False, grid_step="compiled") for _ in range(2))
    step_of = lambda model: next(m.grid_step for m in model.modules() if isinstance(m, bdia_module.BDIALayer))  # noqa: E731
    for model in (broken, healthy):
        step_of(model).devices = ("cuda", "cpu")

    def refuse(fn, m):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(step_of(broken), "_compiled_fn", refuse)
    with pytest.warns(RuntimeWarning, match="compiled BDIA grid step failed") as caught:
        loss, grads = train_step(broken, x)
    assert len([w for w in caught if "grid step failed" in str(w.message)]) == 1
    assert "no compiler here" in step_of(broken).failed and step_of(broken).kind(torch.ones(1)) == "eager"
    assert step_of(healthy).failed is None and step_of(healthy).kind(torch.ones(1)) == "compiled"
    ref_loss, ref_grads = train_step(convert_to_reversible(original, verbose=False, grid_step="eager"), x)
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], ref_grads[n]) for n in grads)


def test_a_copied_model_has_its_own_grid_step_and_host_queue():
    """convert_from_reversible and copy.deepcopy copy a converted model: the copy gets its own GridStep
    (same choice, no compiled forms carried over) and HostQueue, shared by its own layers only."""
    model = convert_to_reversible(LlamaForCausalLM(llama_config()), verbose=False, offload=True,
                                  grid_step="compiled")
    copied = copy.deepcopy(model)
    parts = lambda m: [(layer.grid_step, layer.offload) for layer in m.modules()  # noqa: E731
                       if isinstance(layer, bdia_module.BDIALayer)]
    (step, queue), *rest = parts(model)
    (cstep, cqueue), *crest = parts(copied)
    assert all(s is step and q is queue for s, q in rest) and all(s is cstep and q is cqueue for s, q in crest)
    assert cstep is not step and cqueue is not queue and cstep.mode == "compiled"


def test_grid_step_option_is_checked():
    model = LlamaForCausalLM(llama_config())
    with pytest.raises(ValueError, match="grid_step must be one of .*got 'fast'"):
        convert_to_reversible(model, verbose=False, grid_step="fast")
    with pytest.raises(ValueError, match="coupling='additive' has none"):
        convert_to_reversible(model, "additive", verbose=False, grid_step="eager")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_grid_conversions_equal_their_float64_definition(dtype):
    """to_grid is round-half-even(x * 2^24) and from_grid is X rounded to the dtype, times 2^-24, whatever
    the dtype's fast path: checked against float64 arithmetic on random values over many magnitudes and on
    exact ties (k + 1/2 after scaling)."""
    g = torch.Generator().manual_seed(0)
    mag = 2.0 ** torch.randint(-30, 14 if dtype == torch.float16 else 36, (20000,), generator=g).double()
    x = (torch.randn(20000, generator=g, dtype=torch.float64) * mag)
    ties = (torch.arange(-40, 40, dtype=torch.float64) + 0.5) * 2.0 ** -24
    x = torch.cat([x, ties, -ties, torch.zeros(1)]).to(dtype)
    X = to_grid(x)
    assert X.dtype == torch.int64
    assert torch.equal(X, torch.round(x.double() * 2 ** 24).long())   # float64 holds every value here exactly
    big = torch.randint(-2 ** 62, 2 ** 62, (20000,), generator=g)
    for Y in (X, big):
        assert torch.equal(from_grid(Y, dtype), (Y.to(dtype).double() * 2.0 ** -24).to(dtype))


def test_grid_steps_invert_exactly():
    g = torch.Generator().manual_seed(0)
    X = torch.randint(-2 ** 60, 2 ** 60, (3, 7, 5), generator=g)
    signs = torch.randint(0, 2, (3,), generator=g) * 2 - 1
    for m in (1, 2, 3):
        A, low = gamma_step(X, signs, m)
        assert torch.equal(unpack_bits(pack_bits(low, m), m, X.shape), low)
        assert torch.equal(gamma_unstep(A, low, signs, m), X)
        assert pack_bits(low, m).numel() == -(-X.numel() // 8) * m  # m bits an element
    x = torch.tensor([-3.25, 2.0 ** -24, 1e6])
    assert torch.equal(to_grid(x), torch.tensor([-3.25 * 2 ** 24, 1, 1e6 * 2 ** 24]).long())


def test_non_finite_activations_are_refused_not_rounded():
    torch.manual_seed(0)
    converted = convert_to_reversible(GPT2LMHeadModel(gpt2_config()), verbose=False).train()
    with torch.no_grad():
        converted.transformer.h[1].layer.mlp.c_fc.bias[0] = float("inf")
    with pytest.raises(FloatingPointError, match="fixed-point grid cannot hold"):
        converted(input_ids=ids(), labels=ids())


def test_forward_leaves_no_layer_activation_alive():
    """The forward runs each layer with autograd on (as the recompute does) and drops that graph at once:
    no intermediate of any layer may outlive it (a leaked graph would cost more than plain autograd)."""
    torch.manual_seed(0)
    converted = convert_to_reversible(GPT2LMHeadModel(gpt2_config()), verbose=False).train()
    alive = []
    for block in converted.transformer.h:
        block.layer.mlp.c_fc.register_forward_hook(lambda mod, inp, out: alive.append(weakref.ref(out)))
    loss = converted(input_ids=ids(), labels=ids()).loss
    assert len(alive) == 3 and all(r() is None for r in alive)
    loss.backward()
    assert len(alive) == 6 and all(r() is None for r in alive)


def test_saved_memory_grows_only_by_the_stored_bits():
    """Per extra layer, training keeps the m lost bits of each activation element (packed) and B signs:
    B*S*D*m/8 + 8*B bytes. Plain autograd keeps the layer's activations."""
    B, S, D = 2, 64, 64
    x = ids(B, S)

    def run(model):
        model.train()
        return model(input_ids=x).last_hidden_state.pow(2).mean()

    def converted(depth, gamma0=1 / 2):
        torch.manual_seed(0)
        return convert_to_reversible(GPT2Model(gpt2_config(depth, dropout=0.0)), gamma0=gamma0, verbose=False)

    for gamma0, m in ((1 / 2, 1), (1 / 8, 3)):
        rev2, _ = saved_bytes(lambda: run(converted(2, gamma0)))
        rev8, loss = saved_bytes(lambda: run(converted(8, gamma0)))
        loss.backward()
        per_layer = (rev8 - rev2) / 6
        assert per_layer <= B * S * D * m / 8 + 8 * B, per_layer
    torch.manual_seed(0)
    plain8, _ = saved_bytes(lambda: run(GPT2Model(gpt2_config(8, dropout=0.0))))
    print(f"saved bytes: BDIA L=2 {rev2}, L=8 {rev8}; plain L=8 {plain8}")
    assert plain8 > 4 * rev8


# ---------------------------------------------------------------- two-stream couplings: reported gap

@pytest.mark.parametrize("coupling", ["additive", "affine"])
@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "LlamaModel"])
def test_two_stream_gap_is_measured_and_reported(name, coupling, capsys):
    torch.manual_seed(0)
    original = BUILDERS[name]().eval()
    probe = ids(1, 32, seed=9)
    converted = convert_to_reversible(original, coupling=coupling, probe=probe)
    report = converted.reversible_report
    printed = capsys.readouterr().out
    assert "conversion gap" in printed and f"{report.gap_max_abs:.3g}" in printed
    with torch.no_grad():
        a, b = main_output(original(input_ids=probe)), main_output(converted(input_ids=probe))
    assert report.gap_max_abs == (b.double() - a.double()).abs().max().item() > 1e-3  # a real, visible gap
    assert report.gap_rel == pytest.approx(rel_err(b, a), rel=1e-9)


def test_affine_scale_shrinks_the_gap():
    torch.manual_seed(0)
    original = GPT2LMHeadModel(gpt2_config(layers=4))
    gaps = [convert_to_reversible(original, coupling=c, scale=s, verbose=False).reversible_report.gap_rel
            for c, s in (("additive", 0.5), ("affine", 0.5), ("affine", 0.125))]
    assert gaps[0] > gaps[1] > gaps[2] > 0


@pytest.mark.parametrize("coupling", ["additive", "affine"])
@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "LlamaModel"])
def test_two_stream_gradients_equal_plain_autograd(name, coupling):
    torch.manual_seed(0)
    converted = convert_to_reversible(BUILDERS[name](), coupling=coupling, verbose=False)
    plain = copy.deepcopy(converted)
    for layer in layers_of(plain):
        layer.block.policy = "store"  # the engine's plain-autograd path, same forward
    loss, grads = train_step(converted, ids(), labels=False)
    ref_loss, ref_grads = train_step(plain, ids(), labels=False)
    assert torch.equal(loss, ref_loss)
    assert max(rel_err(grads[n], ref_grads[n]) for n in grads) <= 1e-5


# ---------------------------------------------------------------- checkpointing fallback

class OddLayer(nn.Module):
    """A decoder layer of no recognised layout (no ln_1/attn/... sub-modules)."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + torch.tanh(self.proj(hidden_states))


def test_unrecognised_layers_fall_back_to_checkpointing(capsys):
    torch.manual_seed(0)
    original = GPT2LMHeadModel(gpt2_config(layers=4))
    original.transformer.h[2] = OddLayer(64)
    converted = convert_to_reversible(original, checkpoint_segments=1)
    printed = capsys.readouterr().out
    assert "layer 2 (OddLayer)" in printed and "reversible layers: 0-1, 3" in printed
    assert [i for i, *_ in converted.reversible_report.checkpointed] == [2]
    x = ids()
    with torch.no_grad():
        assert torch.equal(original.eval()(input_ids=x).logits, converted.eval()(input_ids=x).logits)
    loss, grads = train_step(converted, x)
    ref_loss, ref_grads = train_step(bdia_reference(original), x)
    assert torch.equal(loss, ref_loss)
    assert max(rel_err(grads[n], ref_grads[n]) for n in grads) <= 1e-6
    with pytest.raises(ValueError,
                       match=r"1 layers cannot be made reversible \(2 \(OddLayer\)\).*checkpoint_segments=0"):
        convert_to_reversible(original, checkpoint_segments=0, verbose=False)


# ---------------------------------------------------------------- back to plain transformers

@pytest.mark.parametrize("cls, config", [(GPT2LMHeadModel, gpt2_config), (LlamaForCausalLM, llama_config)])
def test_round_trip_loads_in_plain_transformers(cls, config, tmp_path):
    torch.manual_seed(0)
    original = cls(config())
    converted = convert_to_reversible(original, verbose=False)
    opt = torch.optim.SGD(converted.parameters(), lr=0.1)
    for step in range(2):
        train_step(converted, ids(seed=step), seed=step)
        opt.step()
    plain = convert_from_reversible(converted)
    plain.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    assert all(type(layer) is type(layers_of(original)[0]) for layer in layers_of(loaded))
    x = ids(seed=7)
    with torch.no_grad():
        tuned = converted.eval()(input_ids=x).logits
        assert not torch.allclose(tuned, original.eval()(input_ids=x).logits, atol=1e-3)  # it did train
        assert torch.equal(loaded(input_ids=x).logits, tuned)


# ---------------------------------------------------------------- LoRA: frozen base, adapters trained

class LoRA(nn.Module):
    """A hand-written low-rank adapter around a frozen GPT-2 Conv1D (``x @ W + b``)."""

    def __init__(self, base, r=4):
        super().__init__()
        d_in, d_out = base.weight.shape
        self.base = base
        self.A = nn.Parameter(torch.randn(d_in, r) * 0.1)
        self.B = nn.Parameter(torch.randn(r, d_out) * 0.1)

    def forward(self, x):
        return self.base(x) + x @ self.A @ self.B


def test_frozen_base_with_adapters_trains_only_the_adapters():
    torch.manual_seed(0)
    original = GPT2LMHeadModel(gpt2_config())
    original.requires_grad_(False)
    for block in original.transformer.h:
        block.attn.c_attn = LoRA(block.attn.c_attn)
    converted = convert_to_reversible(original, verbose=False)
    loss, grads = train_step(converted, ids())
    ref_loss, ref_grads = train_step(bdia_reference(original), ids())
    assert sorted(grads) == sorted(n for n, p in converted.named_parameters() if p.requires_grad)
    assert all(n.endswith((".A", ".B")) for n in grads) and len(grads) == 6
    assert torch.equal(loss, ref_loss)
    assert max(rel_err(grads[n], ref_grads[n]) for n in grads) <= 1e-6


def test_peft_lora_adapters():
    peft = pytest.importorskip("peft", reason="peft is not installed here (no network to install it); the "
                                              "hand-written adapter test covers frozen-base training")
    torch.manual_seed(0)
    original = GPT2LMHeadModel(gpt2_config())
    config = dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(1)
    converted = peft.get_peft_model(convert_to_reversible(original, verbose=False), peft.LoraConfig(**config))
    torch.manual_seed(1)
    reference = peft.get_peft_model(bdia_reference(original), peft.LoraConfig(**config))
    loss, grads = train_step(converted, ids())
    ref_loss, ref_grads = train_step(reference, ids())
    assert grads and all("lora_" in n for n in grads)
    assert torch.equal(loss, ref_loss)
    assert max(rel_err(grads[n], ref_grads[n]) for n in grads) <= 1e-6


def test_lora_adapters_share_their_input_under_autocast(monkeypatch):
    """peft keeps adapters in float32 on a bf16 model and casts each adapter's input to float32, which
    bf16 autocast casts straight back: the converted layers skip the first cast (no bit changes), so
    q/k/v's adapters share one saved normed input and o's adapter the saved attention output, instead
    of a bf16 copy each: three copies fewer per layer and per run of it (forward and recompute)."""
    peft = pytest.importorskip("peft", reason="peft is not installed here")
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(dropout=0.0)).to(torch.bfloat16)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0,
                             init_lora_weights=False)
    model = peft.get_peft_model(convert_to_reversible(base, verbose=False), config)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    x, storages, real_pack = ids(), {}, bdia_module._pack

    def pack(t):   # distinct storages the converted layers' graphs save (held, so no address is reused)
        st = t.untyped_storage()
        storages[st.data_ptr()] = st
        return real_pack(t)

    def step():
        storages.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, grads = train_step(model, x, labels=False)
        return loss, grads, sum(st.nbytes() for st in storages.values())

    monkeypatch.setattr(bdia_module, "_pack", pack)
    loss, grads, shared = step()
    monkeypatch.setattr(peft_compat, "adapter_input_casts_off", lambda layer, device_type: contextlib.nullcontext())
    loss_cast, grads_cast, copies = step()
    assert torch.equal(loss, loss_cast) and all(torch.equal(grads[n], grads_cast[n]) for n in grads)
    B, S = x.shape
    layers, D = 3, 64
    assert copies - shared == 2 * layers * 3 * B * S * D * 2, (copies, shared)


# ---------------------------------------------------------------- offload: grid tensors in host memory

@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_offload_changes_no_bit(name):
    """offload=True moves where the grid tensors and kept bits wait, not what is computed: loss and
    gradients bitwise equal to offload=False (dropout on, so the recompute's RNG is exercised too).
    On the CPU a parked tensor is handed back as a copy, as a host-to-device copy would be."""
    torch.manual_seed(0)
    original = BUILDERS[name]()
    plain = convert_to_reversible(original, gamma0=1 / 4, verbose=False)
    parked = convert_to_reversible(original, gamma0=1 / 4, verbose=False, offload=True)
    assert "pinned host memory" in str(parked.reversible_report)
    x = ids()
    loss, grads = train_step(plain, x)
    off_loss, off_grads = train_step(parked, x)
    assert torch.equal(loss, off_loss)
    assert grads.keys() == off_grads.keys()
    assert all(torch.equal(grads[n], off_grads[n]) for n in grads)


def test_offload_backward_twice_with_retained_graph():
    torch.manual_seed(0)
    converted = convert_to_reversible(GPT2LMHeadModel(gpt2_config()), verbose=False, offload=True).train()
    loss = converted(input_ids=ids(), labels=ids()).loss
    params = list(converted.parameters())
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_offload_parks_each_grid_tensor_once_per_layer(monkeypatch):
    """What waits in host memory: in forward, X_0 and every layer's output X_{k+1} and its packed bits;
    in backward, each layer's recomputed output b during the layer's backward, and every rebuilt
    X_{k-1} (held on the device for the next layer's one use)."""
    torch.manual_seed(0)
    converted = convert_to_reversible(GPT2LMHeadModel(gpt2_config(layers=4)), gamma0=1 / 8, verbose=False,
                                      offload=True)
    parked = []

    class Recording(offload_module.Parked):
        def __init__(self, t, queue, keep=False):
            parked.append((t.dtype, keep))
            super().__init__(t, queue, keep)

    monkeypatch.setattr(offload_module, "Parked", Recording)
    train_step(converted, ids())
    forward = [(torch.int64, False)] * 5 + [(torch.uint8, False)] * 3   # X_0..X_4, bits of layers 1..3
    backward = [(torch.float32, False), (torch.int64, True)] * 3       # b_3, X_2, b_2, X_1, b_1, X_0
    assert sorted(parked[:8], key=str) == sorted(forward, key=str) and parked[8:] == backward


def test_offload_holds_at_most_the_pair_the_bits_and_one_layer_output_in_host_memory(monkeypatch):
    """Host memory is the budget offload spends: at no time more than two int64 grid tensors, every
    layer's packed bits and one recomputed layer output are parked (a parked tensor no one can use again
    is dropped at once, the run's saved outputs included once the backward has taken them)."""
    torch.manual_seed(0)
    L, B, S, D, m = 5, 2, 19, 64, 3
    converted = convert_to_reversible(GPT2LMHeadModel(gpt2_config(layers=L)), gamma0=1 / 8, verbose=False,
                                      offload=True)
    live = {"now": 0, "peak": 0}

    class Counted(offload_module.Parked):
        def __init__(self, t, queue, keep=False):
            super().__init__(t, queue, keep)
            self.host = t.clone()   # a storage of its own, as a host copy has
            n = t.numel() * t.element_size()
            live["now"] += n
            live["peak"] = max(live["peak"], live["now"])
            weakref.finalize(self, lambda: live.__setitem__("now", live["now"] - n))

    monkeypatch.setattr(offload_module, "Parked", Counted)
    train_step(converted, ids(B, S))
    X, bits, b = B * S * D * 8, -(-B * S * D // 8) * m, B * S * D * 4
    assert live["now"] == 0
    assert live["peak"] <= 2 * X + (L - 1) * bits + b, (live["peak"], X, bits, b)
    assert live["peak"] >= 2 * X + (L - 1) * bits   # the pair and all bits, at the start of the backward


def test_offload_leaves_nothing_per_layer_outside_host_memory_but_the_signs(monkeypatch):
    """With offload, what a training forward leaves alive outside the parked (host) copies grows with
    depth by B signs a layer at most: what lets a few layers stand in for the full depth in the
    longest-context runs (the GPU's own allocator is not modelled here)."""
    from benchmarks.memory_breakdown import LiveTensors
    B, S = 2, 64
    parked = []

    class Own(offload_module.Parked):
        def __init__(self, t, queue, keep=False):
            super().__init__(t, queue, keep)
            self.host = t.clone()   # a storage of its own, as a host copy has
            parked.append(weakref.ref(self))

    monkeypatch.setattr(offload_module, "Parked", Own)
    outside, inside = {}, {}
    for layers in (2, 5):
        torch.manual_seed(0)
        model = convert_to_reversible(GPT2Model(gpt2_config(layers, dropout=0.0)), gamma0=1 / 8, verbose=False,
                                      offload=True).train()
        parked.clear()
        tracer = LiveTensors()
        with tracer:
            loss = model(input_ids=ids(B, S)).last_hidden_state.pow(2).mean()
        held = [p() for p in parked if p() is not None]
        host = sum(p.host.untyped_storage().nbytes() for p in held)
        device = sum(p.dev.untyped_storage().nbytes() for p in held if p.dev is not None)
        outside[layers], inside[layers] = tracer.current - host, host - device
        loss.backward()
        del loss, held
    per_layer = (outside[5] - outside[2]) / 3
    assert per_layer <= 8 * B, per_layer
    assert inside[5] - inside[2] >= 3 * B * S * 64 * 3 // 8   # the bits did go to host memory


def test_offload_step_peak_grows_with_depth_by_the_trainable_gradients_alone(monkeypatch):
    """The whole step's peak outside host memory (forward and backward; LoRA on a bf16 Llama, bf16
    autocast, MLP tiles, offload), from 3 layers on, grows per layer by that layer's LoRA gradients
    and its signs, nothing per token: a few layers stand in for the full depth. (From 2 to 3 layers it
    also gains one [B, S, d] gradient buffer, once: the third layer's x_prev is the first to need a
    gradient, the embeddings being frozen. At 256k tokens of Llama-3-8B that is the 2 GiB the H200
    showed from 2 to 4 layers.)"""
    peft = pytest.importorskip("peft")
    from benchmarks.memory_breakdown import LiveTensors
    from torch.utils._python_dispatch import _disable_current_modes

    class Own(offload_module.Parked):
        def __init__(self, t, queue, keep=False):
            with _disable_current_modes():   # the host copy is not counted: what is left is the device's
                super().__init__(t, queue, keep)
                self.host = t.clone()

    monkeypatch.setattr(offload_module, "Parked", Own)
    S, peaks, grads = 2048, {}, {}   # per token terms (the bits: 96 KiB a layer) outweigh LoRA gradients (22 KiB)
    for layers in (3, 6):
        torch.manual_seed(0)
        config = llama_config(layers, dropout=0.0)
        config.hidden_size, config.intermediate_size, config.max_position_embeddings = 128, 352, S
        model = convert_to_reversible(LlamaForCausalLM(config).to(torch.bfloat16), gamma0=1 / 8, verbose=False,
                                      mlp_chunk_size=64, offload=True)
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                           lora_dropout=0.0)).train()
        x = ids(1, S)
        tracer = LiveTensors()
        with tracer:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
        peaks[layers] = tracer.peak
        grads[layers] = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        del loss, model
    per_layer = (peaks[6] - peaks[3]) / 3
    lora = (grads[6] - grads[3]) / 3
    assert lora <= per_layer <= lora + 8, (per_layer, lora)


def test_host_copies_split_into_power_of_two_chunks(monkeypatch):
    """Pinned blocks are rounded up to a power of two bytes by PyTorch's host allocator: a host copy is
    split into power-of-two chunks and one remainder below ``PIN_CHUNK_MIN``, so it pins at most its
    size plus that; the chunks copy back to the same bits."""
    for numel, size in ((5 * 2 ** 29, 8), (655360 * 4096, 8), (3 * 2 ** 20 + 7, 2), (100, 1), (2 ** 33, 8)):
        chunks = offload_module.host_chunk_sizes(numel, size)
        assert sum(chunks) == numel
        *powers, last = chunks
        assert all(n & (n - 1) == 0 and n * size >= offload_module.PIN_CHUNK_MIN for n in powers), chunks
        pinned = sum(1 << (n * size - 1).bit_length() for n in chunks)   # what the allocator takes
        assert pinned <= numel * size + offload_module.PIN_CHUNK_MIN, (numel, chunks)
    assert offload_module.host_chunk_sizes(655360 * 4096, 8) == [2 ** 31, 2 ** 29]   # 16 + 4 GiB, not 32
    monkeypatch.setattr(offload_module, "PIN_CHUNK_MIN", 64)   # several chunks for a small tensor
    t = torch.randint(-2 ** 40, 2 ** 40, (3, 19, 13))
    chunks = offload_module.to_host(t, pin=False)
    assert [c.numel() for c in chunks] == offload_module.host_chunk_sizes(t.numel(), 8) and len(chunks) > 2
    assert torch.equal(offload_module.from_host(chunks, t.shape, t.device), t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory, streams)")
def test_cuda_parked_tensor_pins_its_size_not_the_next_power_of_two():
    t = torch.randint(-2 ** 40, 2 ** 40, (5, 2 ** 22), device="cuda")   # 160 MiB: 256 MiB if pinned whole
    stats = torch.cuda.host_memory_stats
    before = stats()["allocated_bytes.current"]
    parked = offload_module.Parked(t, offload_module.HostQueue())
    pinned = stats()["allocated_bytes.current"] - before
    assert t.numel() * 8 <= pinned <= t.numel() * 8 + offload_module.PIN_CHUNK_MIN, pinned
    assert torch.equal(parked.take(), t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory, streams)")
def test_offload_on_cuda_same_bits_less_memory(monkeypatch):
    """On the GPU the copies run on a side stream: the rebuilt activations stay bitwise the forward's and
    the loss is bitwise the one without offload; the gradients agree up to the GPU's nondeterministic
    backward sums (fp32, 1e-5). The step's peak drops by at least 3/4 of the int64 grid pair."""
    torch.manual_seed(0)
    config = gpt2_config(layers=4, dropout=0.0)
    config.n_embd, config.n_positions = 256, 4096
    original = GPT2LMHeadModel(config).cuda()
    x = ids(2, 4096).cuda()
    results = {}
    for offload in (False, True):
        converted = convert_to_reversible(original, verbose=False, offload=offload)
        with layer_inputs(converted) as seen:   # its copies on the GPU: not in the measured step
            train_step(converted, x)   # also the warm-up: kernels, handles, pinned blocks
        assert_rebuilt_bitwise(seen, 4)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, grads = train_step(converted, x)
        torch.cuda.synchronize()
        results[offload] = (loss, grads, torch.cuda.max_memory_allocated() - base)
        del converted
    (loss, grads, peak), (off_loss, off_grads, off_peak) = results[False], results[True]
    assert torch.equal(loss, off_loss)
    assert max(rel_err(off_grads[n], grads[n]) for n in grads) <= 1e-5
    pair = 2 * x.numel() * config.n_embd * 8
    print(f"offload peak {off_peak / 2**20:.1f} MiB vs {peak / 2**20:.1f} MiB; int64 pair {pair / 2**20:.1f} MiB")
    assert off_peak <= peak - 0.75 * pair, (off_peak, peak, pair)


# ---------------------------------------------------------------- errors quote the values

def test_errors_name_what_is_wrong():
    with pytest.raises(TypeError, match="GPT2Model, GPT2LMHeadModel, LlamaModel.*Linear has no such layer list"):
        convert_to_reversible(nn.Linear(2, 2))
    model = GPT2Model(gpt2_config(layers=2))
    with pytest.raises(ValueError, match=r"coupling must be one of \('bdia', 'additive', 'affine'\), got 'rev'"):
        convert_to_reversible(model, coupling="rev")
    with pytest.raises(ValueError, match="gamma0 must be 1/2, 1/4 or 1/8.*got 0.3"):
        convert_to_reversible(model, gamma0=0.3)
    with pytest.raises(ValueError, match=r"scale .* must be in \(0, 1\), got 1.5"):
        convert_to_reversible(model, coupling="affine", scale=1.5)
    with pytest.raises(ValueError, match="checkpoint_segments must be None or an int >= 0, got -1"):
        convert_to_reversible(model, checkpoint_segments=-1)
    with pytest.raises(ValueError, match="offload=True keeps BDIA's grid tensors .* coupling='additive' has none"):
        convert_to_reversible(model, coupling="additive", offload=True)
    with pytest.raises(TypeError, match="offload must be a bool, got str"):
        convert_to_reversible(model, offload="yes")
    converted = convert_to_reversible(model, verbose=False)
    with pytest.raises(ValueError, match="GPT2Model is already converted"):
        convert_to_reversible(converted, inplace=True)
    with pytest.raises(ValueError, match="GPT2Model has no converted layers"):
        convert_from_reversible(model)


def test_misuse_in_training_is_refused():
    torch.manual_seed(0)
    converted = convert_to_reversible(GPT2Model(gpt2_config(layers=2)), verbose=False).train()
    h = torch.randn(1, 4, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="converted layer 1 .* did not receive the output of layer 0"):
        converted.h[1](h)
    cache = {CACHE_KW: transformers.DynamicCache(config=converted.config)}
    with torch.no_grad():
        converted.eval()(input_ids=ids(1, 3), use_cache=True, **cache)
    with pytest.raises(ValueError, match=r"non-empty KV cache \(3 tokens\)"):
        converted.train()(input_ids=ids(1, 2), use_cache=True, **cache)


# ---------------------------------------------------------------- MLPs in sequence tiles

@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_tiled_mlp_equals_untiled(name):
    """mlp_chunk_size=7 on 19 positions (tiles 7, 7, 5): the same loss and gradients up to fp32
    rounding (the weight gradients are sums of per-tile products, not one product); dropout off,
    since tiles draw their masks tile by tile."""
    torch.manual_seed(0)
    original = (GPT2LMHeadModel(gpt2_config(dropout=0.0)) if name.startswith("GPT2")
                else LlamaForCausalLM(llama_config(dropout=0.0)))
    plain = convert_to_reversible(original, gamma0=1 / 8, verbose=False)
    tiled = convert_to_reversible(original, gamma0=1 / 8, verbose=False, mlp_chunk_size=7)
    assert "tiles of 7 positions" in str(tiled.reversible_report)
    loss, grads = train_step(plain, ids())
    t_loss, t_grads = train_step(tiled, ids())
    assert rel_err(t_loss, loss) <= 1e-6
    assert grads.keys() == t_grads.keys()
    worst = max(rel_err(t_grads[n], grads[n]) for n in grads)
    assert worst <= 1e-5, worst   # fp32 sums over 3 tiles vs one: a few ulps on each weight gradient
    # eval is untouched: the original model's outputs, bitwise
    tiled.eval()
    original.eval()
    with torch.no_grad():
        assert torch.equal(main_output(tiled(input_ids=ids())), main_output(original(input_ids=ids())))


@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_tiled_bdia_equals_its_reference(name):
    """BDIA stays exact with tiled MLPs, dropout on (each tile's mask is redrawn in backward): the
    loss bitwise and the gradients to 1e-6 against plain autograd of the same tiled forward."""
    torch.manual_seed(0)
    original = BUILDERS[name]()
    converted = convert_to_reversible(original, gamma0=1 / 4, verbose=False, mlp_chunk_size=8)
    reference = bdia_reference(original, gamma0=1 / 4, mlp_chunk_size=8)
    loss, grads = train_step(converted, ids())
    ref_loss, ref_grads = train_step(reference, ids())
    assert torch.equal(loss, ref_loss)
    assert max(rel_err(grads[n], ref_grads[n]) for n in grads) <= 1e-6


def test_tiled_mlp_keeps_only_its_input():
    """What autograd keeps for a tiled MLP is its input (and the weights it already holds): no
    [S, intermediate] tensor, which untiled is kept several times over."""
    from revnet_zero.conversion.tiling import tile_mlp, untile_mlp
    torch.manual_seed(0)
    mlp = LlamaForCausalLM(llama_config(layers=1)).model.layers[0].mlp.train()
    x = torch.randn(1, 64, 64, requires_grad=True)
    plain, y = saved_bytes(lambda: mlp(x))
    g_plain = torch.autograd.grad(y.square().sum(), [x, *mlp.parameters()])
    tile_mlp(mlp, 16)
    tiled, y = saved_bytes(lambda: mlp(x))
    g_tiled = torch.autograd.grad(y.square().sum(), [x, *mlp.parameters()])
    weights = sum(p.numel() * 4 for p in mlp.parameters())
    assert tiled == x.numel() * 4 + weights                 # x and the weights (which the model holds anyway)
    assert plain >= 3 * 64 * 96 * 4 + x.numel() * 4         # gate, up, act(gate) at least
    assert max(rel_err(a, b) for a, b in zip(g_tiled, g_plain)) <= 1e-6
    untile_mlp(mlp)
    assert "forward" not in mlp.__dict__


def test_tiled_lora_trains_only_adapters():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    original = LlamaForCausalLM(llama_config(dropout=0.0))
    config = dict(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], lora_dropout=0.0,
                  init_lora_weights=False)
    models = {}
    for chunk in (None, 6):
        torch.manual_seed(1)
        models[chunk] = peft.get_peft_model(convert_to_reversible(original, verbose=False, mlp_chunk_size=chunk),
                                            peft.LoraConfig(**config))
    loss, grads = train_step(models[None], ids())
    t_loss, t_grads = train_step(models[6], ids())
    assert grads and all("lora_" in n for n in t_grads) and grads.keys() == t_grads.keys()
    assert rel_err(t_loss, loss) <= 1e-6
    assert max(rel_err(t_grads[n], grads[n]) for n in grads) <= 1e-5   # as test_tiled_mlp_equals_untiled
    back = convert_from_reversible(models[6].base_model.model)
    assert not any("forward" in m.__dict__ for m in back.modules())


def test_bad_mlp_chunk_size_is_refused():
    for bad in (0, -4, 2.5, True, "8"):
        with pytest.raises(ValueError, match=f"mlp_chunk_size must be .* got {bad!r}"):
            convert_to_reversible(LlamaForCausalLM(llama_config()), verbose=False, mlp_chunk_size=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("autocast", [False, True])
def test_lean_rmsnorm_is_hugging_faces(dtype, autocast):
    """The lean RMSNorm's output is LlamaRMSNorm's bit for bit; its gradients equal autograd's of
    the module to fp32 rounding (5e-8 measured: an analytic backward against the decomposed ops);
    what it keeps is the input, the weight and one float per row."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from revnet_zero.conversion.rmsnorm import lean_rmsnorm, plain_rmsnorm
    torch.manual_seed(0)
    plain = LlamaRMSNorm(64).train()
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
    lean = copy.deepcopy(plain)
    assert lean_rmsnorm(lean)
    x = torch.randn(2, 33, 64, dtype=dtype, requires_grad=True)
    d = torch.randn(2, 33, 64)
    results = []
    for m in (plain, lean):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            kept, y = saved_bytes(lambda: m(x))
        results.append((kept, y, torch.autograd.grad(y, [x, m.weight], d.to(y.dtype))))
    (k_plain, y_plain, g_plain), (k_lean, y_lean, g_lean) = results
    assert torch.equal(y_lean, y_plain)
    assert rel_err(g_lean[0], g_plain[0]) <= 1e-6 and rel_err(g_lean[1], g_plain[1]) <= 1e-6
    assert k_lean == x.numel() * x.element_size() + 64 * 4 + 2 * 33 * 4
    assert k_plain > k_lean
    plain_rmsnorm(lean)
    assert "forward" not in lean.__dict__


@pytest.mark.parametrize("coupling", ["additive", "bdia"])
def test_a_converted_model_pickles_and_keeps_its_outputs(coupling):
    # the converter bound a module-level function to the model as gradient_checkpointing_enable, and
    # pickle failed: "'GPT2LMHeadModel' object has no attribute '_checkpointing_not_needed'"
    import pickle
    torch.manual_seed(0)
    model = convert_to_reversible(GPT2LMHeadModel(gpt2_config(layers=2, dropout=0.0)), coupling=coupling,
                                  verbose=False).eval()
    copied = pickle.loads(pickle.dumps(model))
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        assert torch.equal(copied(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.warns(UserWarning, match="gradient_checkpointing_enable"):
        copied.gradient_checkpointing_enable()
