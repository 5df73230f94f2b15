"""The Hugging Face model families ``convert_to_reversible`` is tested on (tests/test_families.py).

A family is keyed by its config's ``model_type``. Each converts by the same path: the decoder
layers are wrapped, and the model's own ``forward`` still builds the masks (causal, sliding-window,
packed documents), the rotary embeddings and the soft-capped logits, so a family's attention
options reach its layers unchanged. The entries say what the tests pin for each.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str       # as users know it
    classes: str    # the transformers classes tested (tiny random configs of the family's own config class)
    kept: str       # the family's own options the converted layers are tested to keep
    norm: str       # which RMSNorm backward the converted layers use (rmsnorm.py), or why none


_LLAMA_NORM = "lean (Llama formula)"
_GEMMA_NORM = "lean ((1 + weight) formula)"

FAMILIES = {
    "gpt2": Family("GPT-2", "GPT2Model, GPT2LMHeadModel", "learned positions, dropout", "LayerNorm (autograd)"),
    "llama": Family("Llama", "LlamaModel, LlamaForCausalLM", "grouped-query attention, RoPE", _LLAMA_NORM),
    "mistral": Family("Mistral", "MistralForCausalLM", "sliding-window attention", _LLAMA_NORM),
    "qwen2": Family("Qwen2 / Qwen2.5", "Qwen2ForCausalLM", "q/k/v biases, grouped-query attention", _LLAMA_NORM),
    "qwen3": Family("Qwen3", "Qwen3ForCausalLM", "q/k RMSNorms per head", _LLAMA_NORM),
    "gemma2": Family("Gemma 2", "Gemma2ForCausalLM", "alternating sliding-window layers, attention and final "
                     "logit soft-capping, (1 + w) norms, pre/post feed-forward norms", _GEMMA_NORM),
    "gemma3_text": Family("Gemma 3 (text)", "Gemma3ForCausalLM", "alternating sliding-window layers, q/k norms, "
                          "(1 + w) norms, per-layer-type rotary bases", _GEMMA_NORM),
    "phi3": Family("Phi-3", "Phi3ForCausalLM", "fused qkv and gate/up projections, residual dropout", _LLAMA_NORM),
    "qwen3_moe": Family("Qwen3-MoE", "Qwen3MoeForCausalLM", "top-k routing (same decisions in the recompute), "
                        "auxiliary load-balancing loss and its gradient", _LLAMA_NORM),
    "mixtral": Family("Mixtral", "MixtralForCausalLM", "top-k routing (same decisions in the recompute), "
                      "auxiliary load-balancing loss and its gradient, sliding window", _LLAMA_NORM),
}


def family_of(model) -> str | None:
    """The ``model_type`` of ``model``'s config (a peft wrapper's too), or None if it has none."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return model_type if isinstance(model_type, str) else None


def check_family(model, untested: bool) -> str | None:
    """``model``'s family; a model of no tested family is refused unless ``untested``."""
    model_type = family_of(model)
    if model_type in FAMILIES or untested:
        return model_type
    listed = ", ".join(f"{f.name} ({t})" for t, f in FAMILIES.items())
    raise ValueError(f"convert_to_reversible: {type(model).__name__} (model_type {model_type!r}) is not a tested "
                     f"family; tested: {listed}. Pass untested=True to convert it anyway (the conversion gap is "
                     "still measured and reported)")
