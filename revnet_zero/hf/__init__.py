"""Hugging Face integration: ``RevNetZeroConfig`` and ``RevNetZeroForCausalLM`` (extra ``[hf]``).

Importing this package registers both with ``AutoConfig`` / ``AutoModelForCausalLM`` under the model type
``'revnet_zero'``. The core package never imports it, so it imports with torch alone.

Example::

    from transformers import AutoModelForCausalLM
    from revnet_zero.hf import RevNetZeroConfig, RevNetZeroForCausalLM
    model = RevNetZeroForCausalLM(RevNetZeroConfig(vocab_size=256, num_layers=2, d_model=96, num_heads=4))
    model.save_pretrained("out")                                  # config.json + model.safetensors
    model = AutoModelForCausalLM.from_pretrained("out")
"""
try:
    import transformers
except ImportError as e:
    raise ImportError("revnet_zero.hf needs Hugging Face transformers: pip install 'revnet-zero[hf]'") from e

from .configuration import RevNetZeroConfig
from .modeling import RevNetZeroForCausalLM

transformers.AutoConfig.register(RevNetZeroConfig.model_type, RevNetZeroConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(RevNetZeroConfig, RevNetZeroForCausalLM, exist_ok=True)

__all__ = ["RevNetZeroConfig", "RevNetZeroForCausalLM"]
