"""OptimizerInBackward: AdamW stepped per parameter during backward equals the ordinary step, and the
gradients never pile up."""
import copy

import pytest
import torch

from revnet_zero.models import ReversibleGPT, TransformerConfig
from revnet_zero.training import OptimizerInBackward


def tiny():
    torch.manual_seed(0)
    return ReversibleGPT(TransformerConfig.preset("tiny", num_layers=3))


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 24), generator=g) for _ in range(n)]


def test_same_parameters_as_an_ordinary_adamw_loop():
    """AdamW is element-wise, so one optimizer per parameter stepped from the hooks gives bitwise the
    same parameters as one optimizer over all of them (both with the per-tensor loop, foreach=False)."""
    a, b = tiny(), tiny()
    plain = torch.optim.AdamW(a.parameters(), lr=1e-2, foreach=False)
    fused = OptimizerInBackward(b.parameters(), torch.optim.AdamW, lr=1e-2, foreach=False)
    for ids in batches(3):
        a(ids).loss.backward()
        plain.step()
        plain.zero_grad(set_to_none=True)
        b(ids).loss.backward()
        assert all(p.grad is None for p in b.parameters())
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    state = fused.state_dict()
    fused.remove()
    c = copy.deepcopy(b)
    again = OptimizerInBackward(c.parameters(), torch.optim.AdamW, lr=1e-2, foreach=False)
    again.load_state_dict(state)
    for ids in batches(1):
        a(ids).loss.backward()
        plain.step()
        c(ids).loss.backward()
    for (name, p), q in zip(a.named_parameters(), c.parameters()):
        assert torch.equal(p, q), name


def test_gradients_do_not_pile_up_in_backward():
    """Live tensor bytes at the peak of a step (second step: the AdamW state exists before it): with
    the step in backward the peak holds at most a block's gradients, not all of them."""
    from benchmarks.memory_breakdown import LiveTensors
    peaks = {}
    for name in ("plain", "in_backward"):
        model = tiny()
        if name == "plain":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        else:
            opt = OptimizerInBackward(model.parameters(), torch.optim.AdamW, lr=1e-3, foreach=False)
        for ids in batches(2):
            tracer = LiveTensors()
            with tracer:
                model(ids).loss.backward()
                if name == "plain":
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            peaks[name] = tracer.peak
    grads = sum(p.numel() * p.element_size() for p in tiny().parameters())
    assert peaks["in_backward"] < peaks["plain"] - grads // 2


def test_bad_input():
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        OptimizerInBackward([torch.zeros(2)])
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="same parameter twice"):
        OptimizerInBackward([p, p])
    opt = OptimizerInBackward([p])
    with pytest.raises(ValueError, match="state for 0 parameters"):
        opt.load_state_dict({"per_parameter": []})
