"""The engine gives plain autograd's gradients or raises: never something else.

Each case here gave silently wrong gradients before (relative error 0.1 to 0.7 against the
``store`` policy). The exact cases compare against the same stack under ``policy='store'`` (plain
autograd through the same modules) in float32 with relative error <= 1e-6 in the 2-norm: the
reversible backward reorders float32 sums and rebuilds inputs by subtraction, a few ulps
(2^-24 ~ 6e-8) per block, as in tests/test_engine.py.
"""
import copy

import pytest
import torch
from helpers import MLP, coupling, rel_err

from revnet_zero import AdditiveCoupling, ReversibleBlock, ReversibleSequence


def _store(stack):
    plain = copy.deepcopy(stack)
    plain.set_policy("store")
    return plain


def _loss(y, w):
    return (y[0] * w[0]).sum() + (y[1] * w[1]).sum()


@pytest.mark.parametrize("kind", ["additive", "affine", "custom"])
def test_functional_call_parameters_get_exact_gradients(kind):
    """torch.func.functional_call swaps its own tensors into the modules for the call only; the
    recompute in backward must use them too (before: no gradient for them, wrong input gradient)."""
    torch.manual_seed(0)
    stack = ReversibleSequence([coupling(kind, 8) for _ in range(4)])
    x = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    params = {n: (p.detach() * 1.1 + 0.01).requires_grad_() for n, p in stack.named_parameters()}

    def grads(model):
        y = torch.func.functional_call(model, params, (x,))
        return torch.autograd.grad(_loss(y, w), [x, *params.values()], allow_unused=True)

    got, want = grads(stack), grads(_store(stack))
    assert all(g is not None for g in got)
    assert max(rel_err(a, b) for a, b in zip(got, want)) <= 1e-6
    assert all(p.grad is None for p in stack.parameters())   # the module's own parameters untouched


def test_functional_call_with_non_leaf_parameters():
    """Parameters computed from others (one inner step of MAML): gradients reach the originals."""
    torch.manual_seed(1)
    stack = ReversibleSequence([coupling("additive", 8) for _ in range(3)])
    x, w = torch.randn(2, 4, 8), (torch.randn(2, 4, 8), torch.randn(2, 4, 8))
    base = dict(stack.named_parameters())

    def grads(model):
        fast = {n: p - 0.1 * p.detach().sign() * p for n, p in base.items()}
        y = torch.func.functional_call(model, fast, (x,))
        return torch.autograd.grad(_loss(y, w), list(base.values()))

    assert max(rel_err(a, b) for a, b in zip(grads(stack), grads(_store(stack)))) <= 1e-6


def test_parameter_edited_in_place_before_backward_raises():
    """Plain autograd refuses a saved weight whose version moved; so does the recompute, naming it."""
    torch.manual_seed(2)
    stack = ReversibleSequence([coupling("additive", 8) for _ in range(3)])
    x = torch.randn(2, 4, 8, requires_grad=True)
    for model in (_store(stack), stack):
        y1, y2 = model(x)
        with torch.no_grad():
            model.blocks[1].coupling.f.net[1].weight.add_(0.1)   # e.g. optimizer.step() too early
        with pytest.raises(RuntimeError, match="modified by an inplace operation") as err:
            (y1 * y2).sum().backward()
    assert "'coupling.f.net.1.weight' of block 1" in str(err.value)


def test_parameter_edit_after_backward_is_fine():
    torch.manual_seed(3)
    stack = ReversibleSequence([coupling("additive", 8) for _ in range(3)])
    opt = torch.optim.SGD(stack.parameters(), lr=0.1)
    x = torch.randn(2, 4, 8)
    for _ in range(2):
        y1, y2 = stack(x)
        (y1 * y2).sum().backward()
        opt.step()


def test_forward_hook_replacing_a_blocks_outputs_raises():
    """Block 2's backward rebuilds block 1's outputs from its own inputs: a hook that hands block 2
    something else would make every gradient below wrong (before: silently)."""
    stack = ReversibleSequence([coupling("additive", 8) for _ in range(4)])
    x = torch.randn(2, 4, 8, requires_grad=True)
    handle = stack.blocks[1].register_forward_hook(lambda m, args, out: (out[0] * 2, out[1]))
    with pytest.raises(RuntimeError, match="block 2 of a reversible sequence did not receive the streams"):
        stack(x)
    handle.remove()
    handle = stack.blocks[2].register_forward_pre_hook(lambda m, args: (args[0] + 1, args[1]))
    with pytest.raises(RuntimeError, match="did not receive the streams block 1 returned"):
        stack(x)
    handle.remove()
    with torch.no_grad():   # nothing is rebuilt without grad: hooks may change what they like
        stack.blocks[1].register_forward_hook(lambda m, args, out: (out[0] * 2, out[1]))
        stack(x)


def test_hooks_that_change_outputs_where_that_is_exact():
    """A hook on the last block (its outputs are saved as returned by the Function, the hook's
    change is ordinary autograd after it) and a hook on a sub-function (it runs again in the
    recompute) give plain autograd's gradients."""
    torch.manual_seed(4)
    stack = ReversibleSequence([coupling("additive", 8) for _ in range(3)])
    stack.blocks[2].register_forward_hook(lambda m, args, out: (out[0] * 2, out[1] - 1))
    stack.blocks[1].coupling.g.register_forward_hook(lambda m, args, out: out.tanh())
    x = torch.randn(2, 4, 8, requires_grad=True)
    w = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    params = list(stack.parameters())
    got = torch.autograd.grad(_loss(stack(x), w), [x, *params])
    plain = _store(stack)
    want = torch.autograd.grad(_loss(plain(x), w), [x, *plain.parameters()])
    assert max(rel_err(a, b) for a, b in zip(got, want)) <= 1e-6


def test_hook_on_the_coupling_itself_is_refused():
    """The engine runs a built-in coupling's steps directly (its own hooks would not run) and
    inverts a user coupling without its hooks: refused, with where to register instead."""
    block = ReversibleBlock(coupling("additive", 8))
    block.coupling.register_forward_hook(lambda m, args, out: (out[0] * 2, out[1]))
    x = torch.randn(2, 4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="register them on the ReversibleBlock or on a sub-function"):
        block(x, x)
    block.policy = "store"
    block(x, x)   # plain autograd runs the hook itself


def test_dropout_without_preserved_rng_state_is_refused():
    """With preserve_rng_state=False the recompute draws other dropout masks (gradients 0.5 off
    before): a forward that draws random numbers is refused. Without dropout (p=0 or eval) it
    runs, exactly."""
    torch.manual_seed(5)
    stack = ReversibleSequence([coupling("additive", 8, p=0.2) for _ in range(3)], preserve_rng_state=False)
    x = torch.randn(2, 4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="preserve_rng_state=False"):
        stack(x)
    stack.eval()
    w = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    got = torch.autograd.grad(_loss(stack(x), w), [x, *stack.parameters()])
    plain = _store(stack)
    want = torch.autograd.grad(_loss(plain(x), w), [x, *plain.parameters()])
    assert max(rel_err(a, b) for a, b in zip(got, want)) <= 1e-6
    with torch.no_grad():   # no recompute without grad: dropout is fine
        stack.train()
        stack(x)


def test_tape_slot_must_be_a_tape_slot():
    block = ReversibleBlock(AdditiveCoupling(MLP(8), MLP(8)))
    x = torch.randn(2, 4, 8, requires_grad=True)
    with pytest.raises(TypeError, match="TapeSlot"):
        block(x, x, _tape=(None, 0, True, True))


def test_hooks_that_modify_outputs_in_place_or_pass_views_on():
    """An in-place change of block 1's outputs by a hook is refused like a replacement; a hook that
    passes them on through an identity autograd.Function (FSDP2 does) is not, and stays exact."""
    torch.manual_seed(6)
    stack = ReversibleSequence([coupling("additive", 8) for _ in range(3)])
    x = torch.randn(2, 4, 8, requires_grad=True)

    def in_place(m, args, out):
        with torch.no_grad():
            out[0].mul_(2)

    handle = stack.blocks[1].register_forward_hook(in_place)
    with pytest.raises(RuntimeError, match="did not receive the streams"):
        stack(x)
    handle.remove()

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return a, b

        @staticmethod
        def backward(ctx, da, db):
            return da, db

    stack.blocks[1].register_forward_hook(lambda m, args, out: Identity.apply(*out))
    w = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    got = torch.autograd.grad(_loss(stack(x), w), [x, *stack.parameters()])
    plain = _store(stack)
    want = torch.autograd.grad(_loss(plain(x), w), [x, *plain.parameters()])
    assert max(rel_err(a, b) for a, b in zip(got, want)) <= 1e-6


def test_a_parameter_held_outside_the_block_is_refused():
    """A sub-function that reaches a parameter through a closure runs with it, but the block cannot
    hand it a gradient (before: it silently got none). Found on the block's first backward."""
    outside = torch.nn.Linear(8, 8)

    class Closure(torch.nn.Module):
        def forward(self, x):
            return outside(x)

    for c in (AdditiveCoupling(Closure(), MLP(8)), AdditiveCoupling(MLP(8), Closure())):
        stack = ReversibleSequence([c])
        y1, y2 = stack(torch.randn(2, 4, 8, requires_grad=True))
        with pytest.raises(RuntimeError, match="not held by its coupling"):
            (y1 * y2).sum().backward()
    assert outside.weight.grad is None


def test_frozen_and_unrequested_parameters_are_not_foreign():
    """Parameters of the block that are frozen, or not asked for by autograd.grad, are its own."""
    torch.manual_seed(7)
    stack = ReversibleSequence([coupling(kind, 8) for kind in ("additive", "custom")])
    stack.blocks[0].coupling.f.net[1].weight.requires_grad_(False)
    x = torch.randn(2, 4, 8, requires_grad=True)
    y1, y2 = stack(x)
    (gx,) = torch.autograd.grad((y1 * y2).sum(), [x])
    plain = _store(stack)
    r1, r2 = plain(x)
    (want,) = torch.autograd.grad((r1 * r2).sum(), [x])
    assert rel_err(gx, want) <= 1e-6


def test_inference_mode_forward_matches_no_grad():
    # inference tensors keep no version counter: the engine's record of a block's outputs must not
    # read one (it raised "Inference tensors do not track version counter")
    seq = ReversibleSequence([AdditiveCoupling(f=torch.nn.Linear(8, 8), g=torch.nn.Linear(8, 8)) for _ in range(3)])
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = seq(x)
    with torch.inference_mode():
        got = seq(x)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


class _Scaled(torch.nn.Module):
    """A linear map times a buffer and a keyword tensor: both are read again by the recompute."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("scale", torch.ones(8))

    def forward(self, x, mask):
        return self.lin(x) * self.scale + mask


@pytest.mark.parametrize("edit", ["buffer", "keyword"])
def test_buffer_or_keyword_tensor_edited_in_place_before_backward_raises(edit):
    # both used to be recomputed with the edited values: rebuilt inputs off, wrong gradients, no error
    seq = ReversibleSequence([AdditiveCoupling(f=_Scaled(), g=_Scaled()) for _ in range(2)])
    mask = torch.zeros(2, 5, 8)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y1, y2 = seq(x, mask=mask)
    (seq.blocks[0].coupling.f.scale if edit == "buffer" else mask).add_(1.0)
    with pytest.raises(RuntimeError, match="buffer 'scale'" if edit == "buffer" else "keyword argument 'mask'"):
        (y1 * y2).sum().backward()


def test_buffer_edited_after_backward_is_fine():
    seq = ReversibleSequence([AdditiveCoupling(f=_Scaled(), g=_Scaled()) for _ in range(2)])
    mask = torch.zeros(2, 5, 8)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y1, y2 = seq(x, mask=mask)
    (y1 * y2).sum().backward()
    seq.blocks[0].coupling.f.scale.add_(1.0)
    mask.add_(1.0)
    y1, y2 = seq(x, mask=mask)
    (y1 * y2).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_affine_coupling_keeps_bf16_streams_and_matches_float64_gradients():
    # AffineCoupling's float32 scale widened bf16 streams to float32, so the next block's bf16 Linear
    # failed with "mat1 and mat2 must have the same dtype". Tolerance: bf16 keeps 8 significant bits
    # (eps 2^-8 = 3.9e-3); plain autograd in bf16 is ~2 eps off float64 here, and the rebuild adds one
    # bf16 rounding per stream per block (3 blocks): 0.05 is ~13 eps, and a wrong gradient is O(1) off.
    torch.manual_seed(0)
    from revnet_zero import AffineCoupling
    seq = ReversibleSequence([AffineCoupling(f=torch.nn.Linear(8, 16), g=torch.nn.Linear(8, 16))
                              for _ in range(3)], stream_dtype=None)
    x = torch.randn(2, 5, 8)

    def grads(dtype, policy):
        m = copy.deepcopy(seq).to(dtype)
        m.set_policy(policy)
        xi = x.to(dtype).requires_grad_()
        y1, y2 = m(xi)
        assert y1.dtype == y2.dtype == dtype
        (y1.double() * y2.double()).sum().backward()
        return [xi.grad.double()] + [p.grad.double() for p in m.parameters()]

    ref = grads(torch.float64, "store")
    for policy in ("store", "recompute"):
        errs = [((a - b).norm() / b.norm()).item() for a, b in zip(grads(torch.bfloat16, policy), ref)]
        assert max(errs) < 0.05, (policy, errs)


def test_torch_func_grad_is_refused_with_a_message_that_names_the_way_out():
    # it used to fail inside autograd with "it must override the setup_context staticmethod"
    seq = ReversibleSequence([AdditiveCoupling(f=torch.nn.Linear(8, 8), g=torch.nn.Linear(8, 8)) for _ in range(2)])
    x = torch.randn(2, 5, 8)
    params = {k: v.detach() for k, v in seq.named_parameters()}

    def loss(p):
        y1, y2 = torch.func.functional_call(seq, p, (x,))
        return (y1 * y2).sum()

    with pytest.raises(RuntimeError, match="functional_call with torch.autograd.grad"):
        torch.func.grad(loss)(params)
    # the supported route gives plain autograd's gradients (store policy: no engine)
    ref = copy.deepcopy(seq)
    ref.set_policy("store")
    live = {k: v.clone().requires_grad_() for k, v in params.items()}
    got = torch.autograd.grad(loss(live), list(live.values()))
    want = torch.func.grad(lambda p: (lambda y: (y[0] * y[1]).sum())(torch.func.functional_call(ref, p, (x,))))(params)
    for g, k in zip(got, live):
        torch.testing.assert_close(g, want[k], rtol=1e-5, atol=1e-5)  # float32: rebuild rounding only
