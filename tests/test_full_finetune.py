"""Full-parameter fine-tuning of a converted model with the optimizer stepped inside backward
(``OptimizerInBackward``) and a low-memory AdamW: bitsandbytes' blockwise 8-bit ``AdamW8bit``
(2 bytes of state per parameter, plus one float32 scale per 256-element block of each moment).

Why that one: it runs eagerly on CPU and CUDA (torchao's ``AdamW8bit`` compiles its step: 40 s for
the first shape on this CPU, again per new shape, and ``OptimizerInBackward`` holds one optimizer per
parameter), and ``PagedAdamW8bit`` is the same update with the states in CUDA unified memory.

The check: stepping each parameter as soon as its gradient is accumulated, during the reversible
backward, gives the same weights as stepping one optimizer after backward -- bitwise, since each
tensor's update is the same ops on the same gradient (a tensor's blocks are quantised per tensor).
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

from revnet_zero.conversion import convert_to_reversible  # noqa: E402
from revnet_zero.training.in_backward import OptimizerInBackward  # noqa: E402

VOCAB = 101
# min_8bit_size=0: every tensor of the tiny model gets 8-bit states (the default leaves tensors under
# 4096 elements in 32 bits, which is all of them at this size)
ADAMW = {"lr": 1e-2, "weight_decay": 0.01, "min_8bit_size": 0}


def converted_model():
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return convert_to_reversible(transformers.Qwen2ForCausalLM(config), verbose=False).train()


def batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, VOCAB, (2, 19), generator=g) for _ in range(n)]


def test_8bit_adamw_in_backward_equals_stepping_after_backward():
    in_backward, after = converted_model(), converted_model()
    fused = OptimizerInBackward(in_backward.parameters(), bnb.optim.AdamW8bit, **ADAMW)
    plain = bnb.optim.AdamW8bit(after.parameters(), **ADAMW)
    for step, x in enumerate(batches()):
        torch.manual_seed(step)
        in_backward(input_ids=x, labels=x).loss.backward()
        assert all(p.grad is None for p in in_backward.parameters())   # stepped and freed during backward
        torch.manual_seed(step)
        after(input_ids=x, labels=x).loss.backward()
        plain.step()
        plain.zero_grad(set_to_none=True)
    start = converted_model()
    for (name, p), q, p0 in zip(in_backward.named_parameters(), after.parameters(), start.parameters()):
        assert not torch.equal(p, p0), name   # it trained
        assert torch.equal(p, q), name
    # the states are 8-bit: one byte per element per moment
    for opt in fused.optimizers.values():
        (state,) = opt.state.values()
        assert state["state1"].dtype == state["state2"].dtype == torch.uint8


def test_state_bytes_per_parameter():
    model = converted_model()
    fused = OptimizerInBackward(model.parameters(), bnb.optim.AdamW8bit, **ADAMW)
    x = batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    # per tensor: two uint8 moments, a float32 absmax per 256-element block of each, two 256-entry
    # float32 quantile maps (2 KiB: negligible for the 8B shape's 4096 x 4096 tensors, not here)
    want = sum(2 * p.numel() + 2 * 4 * -(-p.numel() // 256) + 2 * 256 * 4 for p in fused.params)
    assert fused.state_bytes() == want
