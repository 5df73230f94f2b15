"""The reversible transformer language model (decoder-only, causal).

token embedding -> both streams x1 = x2 = emb (Reformer) -> ReversibleSequence of blocks, each
y1 = x1 + Attn(x2), y2 = x2 + FFN(y1) (or the affine rule) -> (y1 + y2) / 2 -> RMSNorm -> head.
The loss goes through ``fused_linear_cross_entropy``: the full [B, S, V] logits never exist in training.
"""
from __future__ import annotations

import abc
import math

import torch
from torch import Tensor, nn

from ..couplings import AdditiveCoupling, make_coupling
from ..engine import ReversibleBlock, ReversibleSequence
from ..layers.reversible_attention import KVCache, SelfAttention
from ..layers.reversible_ffn import FeedForward
from ..layers.rotation_coupling import OrthogonalMixCoupling, RotationCoupling
from ..ops.limits import check_int32_numel
from ..ops.loss import fused_linear_cross_entropy
from .config import TransformerConfig, resolve_config
from .outputs import ModelOutput

IGNORE_INDEX = -100
LOGITS_MAX_SEQ = 4096   # eval forwards up to this length return logits unless told otherwise
EXTRA_RULES = {"rotation": RotationCoupling, "orthogonal": AdditiveCoupling}   # beyond CouplingType
FFN_ACTIVATION = {"swiglu": ("silu", True), "geglu": ("gelu", True), "gelu": ("gelu", False)}


def build_attention(config: TransformerConfig, out_multiplier: int = 1, layer: int = 0) -> SelfAttention:
    """The attention sub-function ``config.attention`` names (``layer`` seeds random features)."""
    if config.attention == "softmax":
        return SelfAttention(config.d_model, config.num_heads, config.num_kv_heads, config.causal,
                             config.rope_theta, config.attention_dropout, config.dropout, config.norm_eps,
                             out_multiplier=out_multiplier, sdpa_backend=config.attention_backend)
    from ..layers import attention_variants as av
    common = dict(num_kv_heads=config.num_kv_heads, rope_theta=config.rope_theta, dropout=config.dropout,
                  norm_eps=config.norm_eps, out_multiplier=out_multiplier)
    if config.attention == "sliding_window":
        return av.SlidingWindowAttention(config.d_model, config.num_heads, config.attention_window, **common)
    if config.attention == "hierarchical":
        return av.HierarchicalAttention(config.d_model, config.num_heads, config.hierarchy_levels,
                                        config.compression_ratios, config.local_window, **common)
    return av.RationalFourierAttention(config.d_model, config.num_heads, config.rf_num_features, config.rf_kernel,
                                       config.rf_learnable, seed=layer, **common)


def build_block(config: TransformerConfig, layer: int = 0) -> ReversibleBlock:
    """One reversible transformer block: attention as F, the FFN as G."""
    rule = EXTRA_RULES.get(config.coupling)
    c = rule() if rule is not None else make_coupling(config.coupling)
    attn = build_attention(config, c.out_multiplier, layer)
    activation, gated = FFN_ACTIVATION[config.ffn]
    ffn = FeedForward(config.d_model, config.d_ff, activation, gated, config.dropout, config.norm_eps,
                      out_multiplier=c.out_multiplier, seq_chunk=config.ffn_chunk_size)
    coupling = make_coupling(c, f=attn, g=ffn)
    if config.coupling == "orthogonal":   # the mixing angle starts at 0: the block starts as additive
        coupling = OrthogonalMixCoupling(coupling, config.d_model)
    return ReversibleBlock(coupling)


class ReversibleLM(nn.Module, abc.ABC):
    """What the decoder and the encoder share: embedding, reversible blocks, final norm, head, loss.

    Subclasses set ``causal`` and say how targets and the attention mask are used.
    """

    causal = True

    def __init__(self, config: TransformerConfig | None = None, **overrides):
        super().__init__()
        name = type(self).__name__
        self.config = c = resolve_config(config, overrides, name, causal=self.causal)
        if c.causal != self.causal:
            raise ValueError(f"{name} needs causal={self.causal}, got config.causal={c.causal}"
                             + ("; use ReversibleBERT for a bidirectional encoder" if self.causal else ""))
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = ReversibleSequence([build_block(c, i) for i in range(c.num_layers)],
                                         stream_dtype=c.stream_dtype)
        self.norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.sequence_parallel = None   # set by revnet_zero.distributed.enable_sequence_parallel
        self.apply(_init_weights)
        for pname, p in self.named_parameters():
            if pname.endswith(("wo.weight", "w_out.weight")):   # GPT-2: residual writes scaled by depth
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.num_layers))
        if c.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, attention_mask: Tensor | None = None,
                return_logits: bool | None = None) -> ModelOutput:
        """input_ids ``[B, S]`` -> ``ModelOutput``. ``return_logits=None``: logits only in eval with
        ``S <= LOGITS_MAX_SEQ``."""
        self._check_inputs(input_ids, labels, attention_mask)
        sp = getattr(self, "sequence_parallel", None)
        targets = self._targets(input_ids, labels, attention_mask)   # over the whole sequence
        if sp is not None:   # this rank's positions only (distributed/sequence_parallel.py)
            sp.check_same_batch(input_ids, targets)
            input_ids = sp.shard(input_ids)
            targets = sp.shard(targets) if targets is not None else None
        hidden = self.hidden_states(input_ids, **self._block_kwargs(attention_mask))
        loss = None
        if targets is not None:
            loss = self._loss(hidden, targets.reshape(-1), sp)
        B, S = input_ids.shape
        if return_logits is None:
            return_logits = not self.training and S <= LOGITS_MAX_SEQ
        logits = None
        if return_logits:
            V = self.config.vocab_size
            check_int32_numel(B * S * V, f"logits [B={B}, S={S}, V={V}]",
                              "Use the loss, or apply model.head to a slice of last_hidden_state.")
            logits = self.head(hidden)
        return ModelOutput(loss=loss, last_hidden_state=hidden, logits=logits)

    def _loss(self, hidden: Tensor, targets: Tensor, sp) -> Tensor:
        """Mean next-token loss. Sequence parallel: the value is the whole batch's mean on every rank;
        the gradient is ``N`` times this rank's share, so the ranks' gradients average to the full one."""
        hidden = hidden.reshape(-1, hidden.shape[-1])
        chunk = self.config.loss_chunk_size
        if sp is None:
            return fused_linear_cross_entropy(hidden, self.head.weight, targets, chunk, IGNORE_INDEX)
        local = fused_linear_cross_entropy(hidden, self.head.weight, targets, chunk, IGNORE_INDEX, "sum")
        count = sp.all_reduce_sum((targets != IGNORE_INDEX).sum()).to(local.dtype)
        # no target in the whole batch: a NaN loss but zero gradients, as one process (0 / 0 would be NaN)
        scaled = local * (sp.size / count.clamp_min(1))
        return scaled + (sp.all_reduce_sum(local) / count - scaled).detach()

    def set_scheduler(self, scheduler) -> None:
        """Apply a memory scheduler's per-block policies (``revnet_zero.memory``)."""
        from ..memory.scheduler import set_scheduler
        set_scheduler(self, scheduler)

    def hidden_states(self, input_ids: Tensor, **block_kwargs) -> Tensor:
        """``[B, S]`` ids -> ``[B, S, D]`` states after the final norm (no input checks)."""
        x = self.embed(input_ids) * self.config.embed_scale   # (B, S, D)
        y1, y2 = self.blocks(x, **block_kwargs)         # both streams start as the embedding
        return self.norm(((y1 + y2) / 2).to(self.norm.weight.dtype))

    def _check_inputs(self, input_ids: Tensor, labels: Tensor | None, attention_mask: Tensor | None) -> None:
        self._check_ids(input_ids)
        for name, t in (("labels", labels), ("attention_mask", attention_mask)):
            if t is not None and (not isinstance(t, Tensor) or t.shape != input_ids.shape):
                raise ValueError(f"{name} must be a tensor shaped like input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if labels is not None and labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels must be integer token ids (int64 or int32), got {labels.dtype}")
        if attention_mask is not None and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError(f"attention_mask must hold 0 (padding) and 1 (token); got values "
                             f"{attention_mask.unique().tolist()[:8]}")

    def _check_ids(self, input_ids: Tensor) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an int64 or int32 tensor, got "
                            f"{input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be [B, S] with B, S >= 1, got shape {tuple(input_ids.shape)}")
        S, max_len, vocab = input_ids.shape[1], self.config.max_seq_len, self.config.vocab_size
        if S > max_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len={max_len}")
        lo, hi = (int(v) for v in input_ids.aminmax())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab}); got min {lo}, max {hi}")

    @abc.abstractmethod
    def _block_kwargs(self, attention_mask: Tensor | None) -> dict:
        """Keyword arguments for the blocks' sub-functions."""

    @abc.abstractmethod
    def _targets(self, input_ids: Tensor, labels: Tensor | None,
                 attention_mask: Tensor | None) -> Tensor | None:
        """Targets ``[B, S]`` aligned with the hidden states (``-100`` = none), or ``None`` for no loss."""


class ReversibleTransformer(ReversibleLM):
    """Decoder-only causal language model whose training keeps no per-layer activations.

    ``ReversibleTransformer(config=None, **overrides)``: a ``TransformerConfig``, or its fields as keywords.
    ``forward(input_ids [B, S], labels=None, attention_mask=None, return_logits=None)`` returns a
    ``ModelOutput``; ``.loss`` is the next-token loss on ``input_ids`` (or on ``labels``, aligned with the
    inputs as in Hugging Face: the shift happens inside), ``-100`` ignored. ``attention_mask`` ``[B, S]``
    must be right padding (each row 1s then 0s); with causal attention real tokens never see the pads, so
    it only removes pad targets from the loss (when ``labels`` is not given). ``model.blocks`` is the
    ``ReversibleSequence``: ``model.blocks.set_policy('store')`` runs plain autograd.

    Example::

        model = ReversibleTransformer(TransformerConfig.preset("tiny"))
        ids = torch.randint(0, 256, (2, 33))
        out = model(ids)
        out.loss.backward()
        model.eval()
        more = model.generate(ids[:, :5], max_new_tokens=8, temperature=0)   # [2, 13], greedy
    """

    causal = True

    def _block_kwargs(self, attention_mask):
        if attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ValueError("attention_mask of a causal model must be right padding (each row: 1s, then 0s); "
                             "left or inner padding would need an S x S mask")
        return {}

    def _targets(self, input_ids, labels, attention_mask):
        src = input_ids if labels is None else labels
        if labels is None and attention_mask is not None:
            src = src.masked_fill(attention_mask == 0, IGNORE_INDEX)
        # position s predicts token s + 1; the last position has no target
        return torch.cat([src[:, 1:], src.new_full((src.shape[0], 1), IGNORE_INDEX)], dim=1).long()

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> Tensor:
        """Continue ``input_ids`` ``[B, S0]`` by ``max_new_tokens`` sampled tokens -> ``[B, S0 + new]``.

        ``temperature=0`` decodes greedily. A per-layer cache (the attention's ``new_cache``: all keys and
        values for exact attention; a fixed-size window, pooled hierarchy or feature state for the
        variants) makes each new token cost one position (a plain forward: the reversible structure
        plays no part at eval). Call ``model.eval()`` first to turn dropout off.
        """
        self._check_ids(input_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        total = input_ids.shape[1] + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        caches = [b.coupling.f.new_cache(total) for b in self.blocks.blocks]
        ids, step = input_ids, input_ids
        for _ in range(max_new_tokens):
            step = _sample(self._cached_step(step, caches), temperature, top_k)   # (B, 1)
            ids = torch.cat([ids, step.to(ids.dtype)], dim=1)
        return ids

    def _cached_step(self, ids: Tensor, caches: list[KVCache]) -> Tensor:
        """Logits ``[B, V]`` at the last of ``ids`` ``[B, T]``, appending their keys/values to ``caches``."""
        return self.head(self.cached_hidden_states(ids, caches)[:, -1]).float()

    def cached_hidden_states(self, ids: Tensor, caches: list) -> Tensor:
        """States ``[B, T, D]`` after the final norm for new tokens ``ids`` ``[B, T]``, reading and
        extending one KV cache per block (eval-time plain forward; anything with ``update(k, v)``
        and ``length`` works as a cache)."""
        x = self.embed(ids) * self.config.embed_scale
        if self.blocks.stream_dtype is not None:
            x = x.to(self.blocks.stream_dtype)
        s = [x, x]
        for block, cache in zip(self.blocks.blocks, caches):
            # kwargs reach F and G alike; the FFN ignores the cache
            s = list(block.coupling(s[0], s[1], cache=cache))
        return self.norm(((s[0] + s[1]) / 2).to(self.norm.weight.dtype))


def _sample(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """One token per row of ``logits`` ``[B, V]`` -> ``[B, 1]``."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
