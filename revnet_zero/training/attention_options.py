"""``LongContextTrainer``'s attention arguments: swap a model's exact attention for a variant in place.

The variants (``revnet_zero.layers.attention_variants``) have exactly the parameters of exact
attention (norm, q/k/v/out projections; random-feature attention adds a fixed frequency buffer), so
a model built with ``attention='softmax'`` can be switched keeping its weights: a fine-tune from exact
to cheaper attention. The switch is logged as a warning; anything else raises, naming the config field
that builds the model directly.
"""
from __future__ import annotations

import dataclasses
import warnings

from torch import nn

from ..models.config import TransformerConfig


def apply_attention_options(model: nn.Module, attention_window_size: int | None,
                            use_linear_attention_approximation: bool) -> str | None:
    """Make ``model`` use sliding-window attention (``attention_window_size``) or random-feature attention
    (``use_linear_attention_approximation``); return what was done (also warned), or None when neither is asked."""
    if attention_window_size is None and not use_linear_attention_approximation:
        return None
    if attention_window_size is not None and use_linear_attention_approximation:
        raise ValueError(f"attention_window_size={attention_window_size} and use_linear_attention_approximation=True "
                         "ask for two different attentions; pass one")
    if use_linear_attention_approximation:
        target, what = {"attention": "rational_fourier"}, "random-feature (linear) attention"
    else:
        target = {"attention": "sliding_window", "attention_window": attention_window_size}
        what = f"sliding-window attention (w={attention_window_size})"
    config, blocks = getattr(model, "config", None), getattr(getattr(model, "blocks", None), "blocks", None)
    field = ", ".join(f"{k}={v!r}" for k, v in target.items())
    if not isinstance(config, TransformerConfig) or blocks is None:
        raise ValueError(f"LongContextTrainer can switch the attention of a ReversibleTransformer/ReversibleGPT only, "
                         f"not a {type(model).__name__}; build the model with TransformerConfig({field}) "
                         f"(or RevNetZeroConfig({field}) for the Hugging Face model)")
    if all(getattr(config, k) == v for k, v in target.items()):
        message = f"LongContextTrainer: the model already uses {what}; nothing changed"
    elif config.attention != "softmax":
        raise ValueError(f"the model uses attention={config.attention!r}; LongContextTrainer switches only exact "
                         f"('softmax') attention; build the model with TransformerConfig({field})")
    else:
        _swap(model, dataclasses.replace(config, **target))
        message = (f"LongContextTrainer: replaced exact attention with {what} in {len(blocks)} blocks, keeping "
                   f"their weights (model.config.attention is now {target['attention']!r})")
    warnings.warn(message, stacklevel=3)
    return message


def _swap(model: nn.Module, config: TransformerConfig) -> None:
    from ..models.reversible_transformer import build_attention
    for i, block in enumerate(model.blocks.blocks):
        old = block.coupling.f
        new = build_attention(config, old.wo.out_features // config.d_model, i)
        new.to(device=old.wo.weight.device)
        missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
        if unexpected or set(missing) - {"frequencies"}:
            raise RuntimeError(f"block {i}: attention weights do not carry over (missing {missing}, "
                               f"unexpected {unexpected})")
        new.train(old.training)
        block.coupling.f = new
    model.config = config
