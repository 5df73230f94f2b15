"""The families on CUDA (skipped without a GPU; run by the GPU issue): bf16 autocast training against the
plain-autograd reference, and packed documents with SDPA and flex_attention's document mask.

Tolerances as in tests/test_conversion.py's CUDA test: the GPU's backward sums are nondeterministic
(atomics), so gradients agree to 1e-5 in fp32 and 1e-2 under bf16 autocast; losses and the rebuilt
layer inputs are bitwise (the forward runs each layer exactly as the recompute does).
"""
import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("transformers")

from test_families import NEW, VOCAB, build, ids, packed_grads, rel_err, train_step  # noqa: E402

from revnet_zero.conversion import bdia_reference, convert_to_reversible  # noqa: E402
from revnet_zero.conversion.bdia import BDIALayer  # noqa: E402


@pytest.mark.parametrize("family", NEW)
def test_family_under_bf16_autocast(family):
    original = build(family).cuda()
    converted, reference = convert_to_reversible(original, verbose=False), bdia_reference(original)
    seen = {}
    hooks = [m.layer.register_forward_pre_hook(lambda mod, args, i=m.index: seen.setdefault(i, []).append(
        args[0].detach().clone())) for m in converted.modules() if isinstance(m, BDIALayer)]
    x = ids(length=256).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = train_step(converted, x)
        for h in hooks:
            h.remove()
        ref_loss, ref_grads = train_step(reference, x)
    assert torch.equal(loss, ref_loss)
    assert max(rel_err(grads[n], ref_grads[n]) for n in ref_grads) <= 1e-2
    assert all(len(v) == 2 and torch.equal(*v) for v in seen.values())


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_packed_documents_on_cuda(attention):
    """flex_attention gets the document mask as a BlockMask from the positions; SDPA a block-diagonal one."""
    model = build("qwen2", dropout=0.0)
    model.config._attn_implementation = attention
    docs = [ids(batch=1, length=70, seed=3).cuda(), ids(batch=1, length=58, seed=4).cuda()]
    try:   # transformers' own path first (seen on an H200, torch 2.11: inductor finds no flex kernel here)
        with torch.no_grad():
            copy.deepcopy(model).cuda().eval()(input_ids=docs[0], use_cache=False)
    except Exception as e:  # noqa: BLE001 - whatever the unconverted model raises
        pytest.skip(f"the unconverted model fails with attention={attention!r} here: {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}")
    converted = convert_to_reversible(model.cuda(), verbose=False)
    packed = torch.cat(docs, 1)
    position_ids = torch.cat([torch.arange(70), torch.arange(58)])[None].cuda()
    weights = torch.randn(1, 128, VOCAB, generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad():
        together = converted.eval()(input_ids=packed, position_ids=position_ids, use_cache=False).logits
        alone = torch.cat([converted(input_ids=d, use_cache=False).logits for d in docs], 1)
    assert torch.allclose(together, alone, atol=1e-5)
    converted.train()

    g_packed = packed_grads(converted, [((packed, position_ids), weights)])
    g_alone = packed_grads(converted, [((docs[0], None), weights[:, :70]), ((docs[1], None), weights[:, 70:])])
    assert max(rel_err(g_packed[n], g_alone[n]) for n in g_alone) <= 1e-5
