"""``RevNetZeroForCausalLM``: ``ReversibleGPT`` as a Hugging Face ``PreTrainedModel``.

Training and uncached forwards run ``ReversibleGPT.forward`` itself (the reversible engine, the fused
chunked loss). Incremental decoding runs the blocks one sub-function at a time with a Hugging Face
``DynamicCache`` behind each attention layer: a plain forward, as in ``ReversibleGPT.generate``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..models.reversible_gpt import ReversibleGPT
from .configuration import RevNetZeroConfig

UNSUPPORTED = ("inputs_embeds", "output_attentions", "output_hidden_states")
# transformers 5.24 renamed the KV cache argument and output field from ``past_key_values`` to ``cache``
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class RevNetZeroForCausalLM(PreTrainedModel, GenerationMixin):
    """``ReversibleGPT`` behind the Hugging Face model API: ``save_pretrained`` / ``from_pretrained``
    (safetensors), ``generate`` with a KV cache, ``Trainer``, peft.

    ``forward(input_ids [B, S], attention_mask=None, labels=None, past_key_values=None, use_cache=None,
    logits_to_keep=0)`` returns ``CausalLMOutputWithPast``:

    * without a cache (``use_cache`` not true, no ``past_key_values``): ``ReversibleGPT.forward``. ``loss``
      only when ``labels`` are given (aligned with the inputs, shifted inside, -100 ignored); ``logits``
      ``[B, S, V]`` in eval mode for ``S <= 4096``, never in training (the loss never forms them), or the
      last ``logits_to_keep`` positions when that is not 0. ``attention_mask`` must be right padding.
    * with a cache (``generate``): a prompt, then one token per call; no loss; ``past_key_values`` is the
      ``DynamicCache`` (one is made when none is given). Padding is refused (the attention mask must be
      all ones): batch prompts of one length. RoPE positions come from the cache length, so
      ``position_ids`` are ignored.

    ``model.model`` is the ``ReversibleGPT``; ``model.model.blocks.set_policy('store')`` runs plain autograd.

    Example::

        config = RevNetZeroConfig.from_transformer_config(TransformerConfig.preset("tiny"))
        model = RevNetZeroForCausalLM(config)
        ids = torch.randint(0, 256, (2, 33))
        model(ids, labels=ids).loss.backward()
        model.eval()
        more = model.generate(ids[:, :5], max_new_tokens=8, do_sample=False)   # [2, 13]
    """

    config_class = RevNetZeroConfig
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}   # only when config.tie_embeddings
    accepts_loss_kwargs = False   # the loss is a token mean of its own; Trainer averages accumulation steps

    def __init__(self, config: RevNetZeroConfig):
        super().__init__(config)
        self.model = ReversibleGPT(config.to_transformer_config())
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.head

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The init of ``ReversibleLM``, for weights a checkpoint lacks: N(0, 0.02); the residual writes
        (``wo``, ``w_out``) N(0, 0.02 / sqrt(2 * num_layers)); norms 1."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            writes = {m for b in self.model.blocks.blocks for m in (b.coupling.f.wo, b.coupling.g.w_out)}
            std = 0.02 / math.sqrt(2 * self.config.num_layers) if module in writes else 0.02
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool | None = None,
                logits_to_keep: int | Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        for name in UNSUPPORTED:
            if kwargs.get(name) is not None and kwargs[name] is not False:
                raise ValueError(f"RevNetZeroForCausalLM does not support {name}")
        if kwargs.get("cache") is not None:   # the name generate() uses from transformers 5.24
            if past_key_values is not None and past_key_values is not kwargs["cache"]:
                raise ValueError("pass the KV cache as cache or as past_key_values, not two different ones")
            past_key_values = kwargs["cache"]
        if past_key_values is not None or use_cache:
            if labels is not None:
                raise ValueError("labels with a KV cache: the cached path is for decoding and has no loss; "
                                 "pass use_cache=False to train or evaluate")
            return self._decode(input_ids, attention_mask, past_key_values, logits_to_keep)
        keep_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
        out = self.model(input_ids, labels=labels, attention_mask=attention_mask,
                         return_logits=None if keep_all else False)
        logits = out.logits
        if not keep_all:
            logits = self.model.head(out.last_hidden_state[:, _positions(logits_to_keep)])
        return CausalLMOutputWithPast(loss=out.loss if labels is not None else None, logits=logits)

    def _decode(self, input_ids: Tensor, attention_mask: Tensor | None, cache: Cache | None,
                logits_to_keep: int | Tensor) -> CausalLMOutputWithPast:
        cache = DynamicCache() if cache is None else cache
        self._check_decode_inputs(input_ids, attention_mask, cache)
        m = self.model
        caches = [_CacheLayer(cache, i) for i in range(len(m.blocks.blocks))]
        h = m.cached_hidden_states(input_ids, caches)[:, _positions(logits_to_keep)]
        return CausalLMOutputWithPast(logits=m.head(h), **{CACHE_FIELD: cache})

    def _check_decode_inputs(self, input_ids: Tensor, attention_mask: Tensor | None, cache: Cache) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an int64 or int32 tensor, got "
                            f"{input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be [B, T] with B, T >= 1, got shape {tuple(input_ids.shape)}")
        past, vocab, max_len = cache.get_seq_length(), self.config.vocab_size, self.config.max_seq_len
        if past + input_ids.shape[1] > max_len:
            raise ValueError(f"{past} cached + {input_ids.shape[1]} new positions exceed max_seq_len={max_len}")
        lo, hi = (int(v) for v in input_ids.aminmax())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab}); got min {lo}, max {hi}")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be [B, S] 1s and 0s, got shape {tuple(attention_mask.shape)}; "
                             "static (compilable) caches, which make 4-d masks, are not supported")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padding is not supported with the KV cache (causal attention here takes no "
                             "mask): generate for prompts of one length, or one prompt at a time")


class _CacheLayer:
    """Layer ``index`` of a Hugging Face ``Cache`` seen through our ``KVCache`` interface."""

    def __init__(self, cache: Cache, index: int):
        self.cache, self.index = cache, index

    @property
    def length(self) -> int:
        return self.cache.get_seq_length(self.index)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k``, ``v`` ``[B, Hkv, T, hd]``; return all keys and values so far."""
        end = self.length + k.shape[2]
        k, v = self.cache.update(k, v, self.index)
        if k.shape[2] != end:
            raise ValueError(f"{type(self.cache).__name__} returned {k.shape[2]} cached positions, expected "
                             f"{end}: only caches holding exactly the positions seen (DynamicCache) are "
                             "supported, not static or sliding-window ones")
        return k, v


def _positions(logits_to_keep: int | Tensor) -> slice | Tensor:
    """Hugging Face's ``logits_to_keep``: 0 = all positions, n = the last n, a tensor = those indices."""
    return slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
