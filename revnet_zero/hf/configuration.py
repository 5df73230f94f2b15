"""``RevNetZeroConfig``: a ``TransformerConfig`` as a Hugging Face ``PretrainedConfig``."""
from __future__ import annotations

import dataclasses

import torch
from transformers import PretrainedConfig

from ..models.config import TransformerConfig

FIELDS = tuple(f.name for f in dataclasses.fields(TransformerConfig))


class RevNetZeroConfig(PretrainedConfig):
    """Holds the fields of ``TransformerConfig`` (same names and defaults, validated by it), plus Hugging Face's
    own keywords (``bos_token_id``, ...). Fields left ``None`` are stored resolved (``d_ff``, ``num_kv_heads``,
    ``embed_scale``), so a saved ``config.json`` keeps meaning the same model if a default changes.
    ``stream_dtype`` is stored as a string (``'float32'``) or ``None``. The standard names
    (``hidden_size``, ``num_hidden_layers``, ...) read and write the matching fields.

    Example::

        cfg = RevNetZeroConfig(vocab_size=256, num_layers=2, d_model=96, num_heads=4)
        cfg = RevNetZeroConfig.from_transformer_config(TransformerConfig.preset("tiny"))
        cfg.to_transformer_config().d_ff            # 256
    """

    model_type = "revnet_zero"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "num_key_value_heads": "num_kv_heads",
        "intermediate_size": "d_ff",
        "max_position_embeddings": "max_seq_len",
        "tie_word_embeddings": "tie_embeddings",
    }

    def __init__(self, **kwargs):
        for alias, name in self.attribute_map.items():
            if alias in kwargs:
                if name in kwargs:
                    raise ValueError(f"got both {alias}={kwargs[alias]!r} and {name}={kwargs[name]!r}; "
                                     f"{alias} is another name for {name}")
                kwargs[name] = kwargs.pop(alias)
        ours = {name: kwargs.pop(name) for name in FIELDS if name in kwargs}
        if isinstance(ours.get("stream_dtype"), str):
            ours["stream_dtype"] = _dtype(ours["stream_dtype"])
        resolved = TransformerConfig(**ours)
        for name in FIELDS:
            setattr(self, name, getattr(resolved, name))
        if resolved.stream_dtype is not None:
            self.stream_dtype = str(resolved.stream_dtype).removeprefix("torch.")
        # transformers 4.x defaults tie_word_embeddings to True in its own __init__: pass ours on.
        super().__init__(tie_word_embeddings=resolved.tie_embeddings, **kwargs)

    @classmethod
    def from_transformer_config(cls, config: TransformerConfig, **kwargs) -> RevNetZeroConfig:
        """The fields of ``config``; ``kwargs`` are Hugging Face keywords (``bos_token_id``, ...)."""
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        return cls(**{name: getattr(config, name) for name in FIELDS}, **kwargs)

    def to_transformer_config(self) -> TransformerConfig:
        fields = {name: getattr(self, name) for name in FIELDS}
        if fields["stream_dtype"] is not None:
            fields["stream_dtype"] = _dtype(fields["stream_dtype"])
        return TransformerConfig(**fields)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"stream_dtype must name a torch dtype ('float32', 'bfloat16', ...), got {name!r}")
    return dtype
