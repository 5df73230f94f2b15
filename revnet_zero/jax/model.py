"""``ReversibleTransformerJAX``: the PyTorch ``ReversibleTransformer`` in Flax linen.

embedding * embed_scale -> both streams -> L reversible blocks (F = attention, G = SwiGLU FFN) ->
(y1 + y2) / 2 -> RMSNorm -> head, with the next-token loss computed a chunk of tokens at a time.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ..models.config import TransformerConfig
from ..models.reversible_transformer import IGNORE_INDEX, LOGITS_MAX_SEQ
from .layers import ATTENTION_NAME, attention, feed_forward, rms_norm
from .loss import linear_cross_entropy
from .reversible import plain_stack, reversible_stack

# How the blocks are differentiated (the math is the same for all):
MEMORY_POLICIES = (
    "recompute",          # reversible custom_vjp: nothing kept per block, inputs rebuilt from outputs
    "store",              # plain autodiff: every block's activations kept
    "checkpoint",         # jax.checkpoint per block: its inputs kept, everything else recomputed
    "store_attention",    # jax.checkpoint per block, the attention output also kept
    "offload_attention",  # as store_attention, the attention output kept in pinned host memory
)
COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")
CONFIG_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "d_ff", "max_seq_len",
                 "dropout", "ffn", "norm_eps", "rope_theta", "tie_embeddings", "embed_scale", "loss_chunk_size",
                 "ffn_chunk_size")


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy of a memory policy (``None``: not a remat policy)."""
    cp = jax.checkpoint_policies
    if name == "checkpoint":
        return cp.nothing_saveable
    if name == "store_attention":
        return cp.save_only_these_names(ATTENTION_NAME)
    if name == "offload_attention":
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=[ATTENTION_NAME],
            offload_src="device", offload_dst="pinned_host")
    return None


@flax.struct.dataclass
class JAXOutput:
    loss: Any                  # scalar next-token loss (mean over targets that are not -100)
    last_hidden_state: Any     # [B, S, D] after the final norm
    logits: Any = None         # [B, S, V] in the stream dtype, or None (see ``return_logits``)


class ReversibleTransformerJAX(nn.Module):
    """Decoder-only causal LM whose training keeps no per-layer activations (additive coupling).

    The fields are those of ``TransformerConfig`` (same defaults, same validation) plus the JAX options.
    ``apply(variables, input_ids [B, S], labels=None, return_logits=None, deterministic=True)`` returns a
    ``JAXOutput``: the next-token loss on ``input_ids`` (or on ``labels`` aligned with them, shifted
    inside, -100 ignored) and, when ``return_logits`` (default: ``deterministic`` and ``S <= 4096``),
    the logits. Dropout needs ``deterministic=False`` and ``rngs={'dropout': key}``.

    Example::

        model = ReversibleTransformerJAX(vocab_size=256, num_layers=2, d_model=64, num_heads=4, use_scan=True)
        ids = jnp.ones((2, 16), jnp.int32)
        params = model.init(jax.random.key(0), ids)
        loss, grads = jax.value_and_grad(lambda p: model.apply(p, ids).loss)(params)
    """

    vocab_size: int = 32000                # token ids lie in [0, vocab_size)
    num_layers: int = 24                   # reversible blocks, each one attention + one FFN
    d_model: int = 1024                    # width of each stream
    num_heads: int = 16                    # query heads; head_dim = d_model / num_heads, even
    num_kv_heads: int | None = None        # key/value heads (GQA); None = num_heads
    d_ff: int | None = None                # FFN hidden width; None = as TransformerConfig
    max_seq_len: int = 4096                # longest accepted input
    dropout: float = 0.0                   # on each attention and FFN output (needs an rng 'dropout')
    ffn: str = "swiglu"                    # 'swiglu', 'geglu' or 'gelu'
    norm_eps: float = 1e-5                 # RMSNorm epsilon
    rope_theta: float = 10000.0            # RoPE base
    tie_embeddings: bool = False           # the head is the embedding's transpose (no 'head' parameter)
    embed_scale: float | None = None       # streams start at embedding * embed_scale; None = sqrt(d_model)
    loss_chunk_size: int = 4096            # tokens per chunk of the head + loss
    ffn_chunk_size: int | None = 16384     # positions per FFN tile (used when it divides S); None = whole
    use_scan: bool = True                  # blocks under lax.scan (compiled once) or an unrolled loop
    compute_dtype: Any = "float32"         # dtype of the matmuls and attention; streams stay float32
    memory_policy: str = "recompute"       # one of MEMORY_POLICIES (JAXMemoryScheduler sets it)
    attention_implementation: str | None = None   # jax.nn.dot_product_attention's: None, 'xla', 'cudnn'

    def __post_init__(self):
        self.torch_config()   # validates the shared fields, with TransformerConfig's messages
        if jnp.dtype(self.compute_dtype).name not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.memory_policy not in MEMORY_POLICIES:
            raise ValueError(f"memory_policy must be one of {MEMORY_POLICIES}, got {self.memory_policy!r}")
        if self.attention_implementation not in (None, "xla", "cudnn"):
            raise ValueError("attention_implementation must be None, 'xla' or 'cudnn', got "
                             f"{self.attention_implementation!r}")
        if not isinstance(self.use_scan, bool):
            raise TypeError(f"use_scan must be a bool, got {self.use_scan!r}")
        super().__post_init__()

    def torch_config(self) -> TransformerConfig:
        """The PyTorch ``TransformerConfig`` of this model (``ReversibleTransformer(model.torch_config())``
        takes the same weights)."""
        return TransformerConfig(**{k: getattr(self, k) for k in CONFIG_FIELDS})

    @classmethod
    def from_config(cls, config: TransformerConfig, **options) -> ReversibleTransformerJAX:
        """The JAX model of a PyTorch ``TransformerConfig``; ``options``: the JAX-only fields."""
        unsupported = {"coupling": ("additive", config.coupling), "causal": (True, config.causal),
                       "attention_dropout": (0.0, config.attention_dropout)}
        for name, (want, got) in unsupported.items():
            if got != want:
                raise ValueError(f"the JAX port supports {name}={want!r} only, got {got!r}")
        return cls(**{k: getattr(config, k) for k in CONFIG_FIELDS}, **options)

    def setup(self):
        c = self.torch_config()
        L, D, F, V, hd = c.num_layers, c.d_model, c.d_ff, c.vocab_size, c.head_dim
        w_in = (2 if self.ffn != "gelu" else 1) * F
        normal, out_std = nn.initializers.normal(0.02), 0.02 / (2 * L) ** 0.5   # GPT-2: writes scaled by depth

        def blocks_init(key):
            k = jax.random.split(key, 6)
            ones = jnp.ones((L, D), jnp.float32)
            return {"attn": {"norm": ones, "wq": normal(k[0], (L, D, D)), "wk": normal(k[1], (L, D, c.num_kv_heads * hd)),
                             "wv": normal(k[2], (L, D, c.num_kv_heads * hd)),
                             "wo": out_std * jax.random.normal(k[3], (L, D, D))},
                    "ffn": {"norm": ones, "w_in": normal(k[4], (L, D, w_in)),
                            "w_out": out_std * jax.random.normal(k[5], (L, F, D))}}

        self.embed = self.param("embed", normal, (V, D))
        self.blocks = self.param("blocks", blocks_init)
        self.norm = self.param("norm", nn.initializers.ones, (D,))
        if not self.tie_embeddings:
            self.head = self.param("head", normal, (D, V))

    def head_weight(self):
        """The head ``[D, V]``."""
        return self.embed.T if self.tie_embeddings else self.head

    def __call__(self, input_ids, labels=None, *, return_logits: bool | None = None,
                 deterministic: bool = True) -> JAXOutput:
        check_ids(input_ids, self.vocab_size, self.max_seq_len)
        if labels is not None and tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(f"labels must be shaped like input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        hidden = self.hidden_states(input_ids, deterministic=deterministic)
        B, S = input_ids.shape
        src = input_ids if labels is None else labels
        targets = jnp.concatenate([src[:, 1:], jnp.full((B, 1), IGNORE_INDEX, src.dtype)], axis=1)
        dtype = jnp.dtype(self.compute_dtype)
        loss = linear_cross_entropy(hidden.reshape(B * S, -1), self.head_weight(), targets.reshape(-1),
                                    self.loss_chunk_size, dtype, IGNORE_INDEX)
        if return_logits is None:
            return_logits = deterministic and S <= LOGITS_MAX_SEQ
        logits = None
        if return_logits:
            logits = (hidden.astype(dtype) @ self.head_weight().astype(dtype)).astype(self.stream_dtype)
        return JAXOutput(loss=loss, last_hidden_state=hidden, logits=logits)

    def hidden_states(self, input_ids, deterministic: bool = True):
        """``[B, S]`` ids -> ``[B, S, D]`` states (``stream_dtype``) after the final norm (no input checks)."""
        x = jnp.take(self.embed, input_ids, axis=0).astype(self.stream_dtype) * self.torch_config().embed_scale
        f, g = self._sub_functions()
        keys = None
        if not deterministic and self.dropout > 0:
            k = jax.random.split(self.make_rng("dropout"), 2 * self.num_layers).reshape(2, self.num_layers)
            keys = (k[0], k[1])
        params = (self.blocks["attn"], self.blocks["ffn"])
        if self.memory_policy == "recompute":
            y1, y2 = reversible_stack(f, g, self.use_scan, params, x, x, keys)
        else:
            y1, y2 = plain_stack(f, g, self.use_scan, params, x, x, keys, remat_policy(self.memory_policy))
        return rms_norm((y1 + y2) / 2, self.norm, self.norm_eps, self.stream_dtype)

    @property
    def stream_dtype(self):
        """float32, or float64 when ``compute_dtype`` is float64 (the streams are never below float32:
        inputs are rebuilt by subtraction, which would amplify low-precision rounding block after block)."""
        return jnp.promote_types(jnp.float32, jnp.dtype(self.compute_dtype))

    def _sub_functions(self):
        c, dtype = self.torch_config(), jnp.dtype(self.compute_dtype)
        f = partial(attention, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, theta=c.rope_theta, eps=c.norm_eps,
                    dtype=dtype, rate=c.dropout, implementation=self.attention_implementation)
        g = partial(feed_forward, kind=c.ffn, eps=c.norm_eps, dtype=dtype, rate=c.dropout, chunk=c.ffn_chunk_size)
        return _Hashable(f), _Hashable(g)


class _Hashable:
    """A sub-function with value equality (custom_vjp's static arguments are compared by value, so two
    traces of the same model share one cache entry)."""

    def __init__(self, fn: partial):
        self.fn = fn
        self.key = (fn.func, tuple(sorted(fn.keywords.items())))

    def __call__(self, p, x, key):
        return self.fn(p, x, key)

    def __eq__(self, other):
        return isinstance(other, _Hashable) and self.key == other.key

    def __hash__(self):
        return hash(self.key)


def check_ids(input_ids, vocab_size: int, max_seq_len: int) -> None:
    """ValueError/TypeError for ids of the wrong rank, dtype, length or (when concrete) range."""
    shape = getattr(input_ids, "shape", None)
    dtype = getattr(input_ids, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"input_ids must be an integer array, got {dtype if dtype is not None else type(input_ids).__name__}")
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"input_ids must be [B, S] with B, S >= 1, got shape {tuple(shape)}")
    if shape[1] > max_seq_len:
        raise ValueError(f"sequence length {shape[1]} exceeds max_seq_len={max_seq_len}")
    if isinstance(input_ids, jax.core.Tracer):
        return   # values unknown under jit: JAXMemoryScheduler's step checks them before tracing
    ids = np.asarray(input_ids)   # numpy: jnp reductions would be staged into an enclosing jit
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}); got min {lo}, max {hi}")
