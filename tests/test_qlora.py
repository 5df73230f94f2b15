"""QLoRA through the conversion: bitsandbytes nf4 ``Linear4bit`` frozen base weights, peft LoRA adapters.

The tiny model is saved and loaded back with ``BitsAndBytesConfig(load_in_4bit=True, nf4)``, the way
users load a 4-bit model; bitsandbytes 0.50 runs nf4 forward and backward on the CPU, so the
exactness checks run here. Tolerances as in tests/test_conversion.py: losses bitwise against
``bdia_reference`` under the same 4-bit kernels, adapter gradients relative 1e-6 (fp32), the layers'
inputs rebuilt bitwise. On CUDA (bf16 compute): losses bitwise, gradients 1e-2 (the GPU's
nondeterministic backward sums in bf16, as in test_conversion's CUDA test).
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from revnet_zero.conversion import bdia_reference, convert_to_reversible  # noqa: E402
from revnet_zero.conversion.bdia import BDIALayer  # noqa: E402

VOCAB = 101
CONFIGS = {
    "qwen2": ("Qwen2Config", {}),   # q/k/v biases: a 4-bit matmul with a bias
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8,
                                         "layer_types": ["sliding_attention", "full_attention"]}),
}
LORA = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "lora_dropout": 0.0,
        "init_lora_weights": False}


def four_bit(family, where, device, compute_dtype):
    config_cls, own = CONFIGS[family]
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=256, **own)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(where)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=compute_dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(where, quantization_config=quant, device_map=device)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            # bitsandbytes' CPU back end repacks the weights for an inference kernel on the first eval
            # forward (the converter's probe is one), after which training forwards take that kernel,
            # which has no backward; a bitsandbytes CPU matter, the plain model too. Not on CUDA.
            m.support_avx512bf16_for_cpu = False
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def with_adapters(model):
    torch.manual_seed(1)
    return peft.get_peft_model(model, peft.LoraConfig(**LORA))


def train_step(model, x):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check(family, tmp_path, device, compute_dtype, tol):
    base = four_bit(family, tmp_path, device, compute_dtype)
    linears = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(m.weight.quant_state.quant_type == "nf4" for m in linears)
    converted = with_adapters(convert_to_reversible(base, verbose=False))
    reference = with_adapters(bdia_reference(base))
    seen = {}
    hooks = [m.layer.register_forward_pre_hook(lambda mod, args, i=m.index: seen.setdefault(i, []).append(
        args[0].detach().clone())) for m in converted.modules() if isinstance(m, BDIALayer)]
    x = torch.randint(1, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1)).to(device)
    loss, grads = train_step(converted, x)
    for h in hooks:
        h.remove()
    ref_loss, ref_grads = train_step(reference, x)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads and all("lora_" in n for n in grads)
    assert len(grads) == 2 * 3 * 2   # A and B of three adapted projections in two layers
    worst = max(rel_err(grads[n], ref_grads[n]) for n in grads)
    assert worst <= tol, worst
    assert sorted(seen) == [0, 1] and all(len(v) == 2 and torch.equal(*v) for v in seen.values())
    # a step moves the adapters only: the 4-bit weights keep their bytes
    packed = {n: m.weight.detach().clone() for n, m in converted.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    torch.optim.SGD([p for p in converted.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(m.weight, packed[n]) for n, m in converted.named_modules()
               if isinstance(m, bnb.nn.Linear4bit))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_qlora_nf4_on_cpu(family, tmp_path):
    check(family, tmp_path, "cpu", torch.float32, 1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes' CUDA nf4 kernels)")
@pytest.mark.parametrize("family", list(CONFIGS))
def test_qlora_nf4_on_cuda(family, tmp_path):
    check(family, tmp_path, "cuda", torch.bfloat16, 1e-2)
