"""The single-stream baseline modes (single_standard, single_full_ac) of the benchmark harness."""
import pytest
import torch

from helpers import rel_err
from revnet_zero import ReversibleTransformer, TransformerConfig
from revnet_zero.benchmarks import apply_mode
from revnet_zero.ops.loss import fused_linear_cross_entropy


def _model(**kw):
    torch.manual_seed(0)
    return ReversibleTransformer(TransformerConfig.preset("tiny", **kw))


def _plain_single_stream_loss(model, ids):
    """A standard pre-norm transformer written out: one stream, x += F(x); x += G(x), same weights and loss."""
    x = model.embed(ids) * model.config.embed_scale
    for block in model.blocks.blocks:
        x = x + block.coupling.f(x)
        x = x + block.coupling.g(x)
    h = model.norm(x)
    targets = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), -100)], dim=1)
    return fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.head.weight, targets.reshape(-1),
                                      model.config.loss_chunk_size, -100)


def _grads(model, ids, mode):
    model.zero_grad()
    with apply_mode(model, mode):
        loss = model(ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_single_standard_is_a_one_stream_transformer_with_the_same_loss():
    model, ids = _model(), torch.randint(0, 256, (2, 37))
    loss, grads = _grads(model, ids, "single_standard")
    want = _plain_single_stream_loss(model, ids)
    # same ops in the same order in fp32: equal up to rounding of the fused loss' chunking (none here)
    assert rel_err(loss, want) <= 1e-6
    assert all(torch.isfinite(g).all() for g in grads.values())
    reversible, _ = _grads(model, ids, "standard")
    assert abs(reversible.item() - loss.item()) > 1e-4     # a different network: not the two-stream block


def test_single_full_ac_gradients_equal_plain_ones():
    # torch.utils.checkpoint reruns the same fp32 ops on CPU: gradients equal up to rounding (1e-6)
    model, ids = _model(), torch.randint(0, 256, (2, 37))
    loss_p, plain = _grads(model, ids, "single_standard")
    loss_c, ckpt = _grads(model, ids, "single_full_ac")
    assert rel_err(loss_c, loss_p) <= 1e-7
    assert max(rel_err(ckpt[n], plain[n]) for n in plain) <= 1e-6
    assert model.blocks.__class__.__name__ == "ReversibleSequence"    # apply_mode put the stack back


def test_stream_takes_the_autocast_dtype():
    model, ids = _model(), torch.randint(0, 256, (1, 16))
    seen = []
    hook = model.blocks.blocks[0].coupling.f.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16), apply_mode(model, "single_standard"):
        loss = model(ids).loss
    hook.remove()
    loss.backward()
    assert seen == [torch.bfloat16] and torch.isfinite(loss)


def test_single_stream_refuses_affine_couplings():
    model = _model(coupling="affine")
    with pytest.raises(ValueError, match="need additive couplings .* block 0 has AffineCoupling"):
        with apply_mode(model, "single_standard"):
            pass
