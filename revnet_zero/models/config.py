"""The configuration of the reversible transformer models, with named presets."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..couplings import CouplingType
from ..ops.limits import INT32_MAX_NUMEL

FFN_KINDS = ("swiglu", "geglu", "gelu")
# rotation: revnet_zero.layers.RotationCoupling; orthogonal: additive, then a learned OrthogonalMixing
COUPLINGS = tuple(c.value for c in CouplingType) + ("rotation", "orthogonal")


def default_d_ff(d_model: int, ffn: str) -> int:
    """8/3 * d_model rounded up to a multiple of 128 for gated FFNs (2816 at d = 1024), 4 * d_model else."""
    return -(-8 * d_model // (3 * 128)) * 128 if ffn != "gelu" else 4 * d_model


@dataclass
class TransformerConfig:
    """Shape and options of ``ReversibleTransformer`` / ``ReversibleGPT`` / ``ReversibleBERT``.

    Fields left ``None`` (``num_kv_heads``, ``d_ff``) are resolved in ``__post_init__``.

    Example::

        cfg = TransformerConfig.preset("S", max_seq_len=262144)
        cfg.d_ff                                    # 2816
    """

    vocab_size: int = 32000                  # token ids lie in [0, vocab_size)
    num_layers: int = 24                     # reversible blocks, each one attention + one FFN
    d_model: int = 1024                      # width of each of the two residual streams
    num_heads: int = 16                      # query heads; head_dim = d_model / num_heads, even (RoPE)
    num_kv_heads: int | None = None          # key/value heads (GQA); None = num_heads
    d_ff: int | None = None                  # FFN hidden width; None = default_d_ff(d_model, ffn)
    max_seq_len: int = 4096                  # longest accepted input; costs nothing (RoPE is computed per call)
    dropout: float = 0.0                     # on each attention and FFN output
    attention_dropout: float = 0.0           # on the attention probabilities (SDPA dropout_p)
    coupling: str = "additive"               # 'additive', 'affine' / 'rotation' (F, G output 2 * d_model), 'orthogonal'
    ffn: str = "swiglu"                      # 'swiglu', 'geglu' (gated) or 'gelu' (plain MLP)
    norm_eps: float = 1e-5                   # RMSNorm epsilon
    rope_theta: float = 10000.0              # RoPE base (Llama 3 uses 500000)
    tie_embeddings: bool = False             # share the token embedding with the output head
    embed_scale: float | None = None         # streams start at embedding * embed_scale; None = sqrt(d_model).
    # Why: with embeddings of std 0.02 the blocks' outputs dwarf the streams, and rebuilding inputs by
    # subtraction then loses precision block after block (docs/numerics.md). Gemma and T5 scale likewise.
    causal: bool = True                      # causal decoder; ReversibleBERT sets False
    stream_dtype: torch.dtype | None = torch.float32  # dtype of the two streams (None = the embedding's)
    loss_chunk_size: int = 4096              # tokens per chunk of the fused head + loss (logits chunk < 2^31)
    ffn_chunk_size: int | None = 16384       # positions per FFN tile in forward and recompute; None = whole
    use_flash_attention: bool = True         # must be True: attention always runs through SDPA kernels
    attention_backend: str = "cudnn"         # SDPA kernel of reversible attention on CUDA, bf16/fp16: 'cudnn'/'flash'
    # Which attention (docs/attention.md): 'softmax' (exact), 'sliding_window', 'hierarchical',
    # 'rational_fourier'. Each variant reads only its own fields below; all are validated always.
    attention: str = "softmax"
    attention_window: int = 4096             # sliding_window: each query sees its last w tokens
    hierarchy_levels: int = 3                # hierarchical: pooled levels, = len(compression_ratios)
    compression_ratios: tuple[int, ...] = (4, 16, 64)  # hierarchical: tokens per pooled block, level by level
    local_window: int = 1024                 # hierarchical: exact keys per query (w to w + r_1 - 1)
    rf_kernel: str = "gaussian"              # rational_fourier: 'gaussian', 'laplacian' or 'cauchy'
    rf_num_features: int = 64                # rational_fourier: random features per head (even for trig kernels)
    rf_learnable: bool = False               # rational_fourier: train the frequencies (else a fixed buffer)

    def __post_init__(self):
        if isinstance(self.coupling, CouplingType):
            self.coupling = self.coupling.value
        if self.embed_scale is None and _is_int(self.d_model):
            self.embed_scale = float(self.d_model) ** 0.5
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if isinstance(self.compression_ratios, list):   # as JSON gives it back
            self.compression_ratios = tuple(self.compression_ratios)
        if self.d_ff is None and self.ffn in FFN_KINDS and _is_int(self.d_model):
            self.d_ff = default_d_ff(self.d_model, self.ffn)
        self._validate()

    def _validate(self) -> None:
        if self.coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {list(COUPLINGS)}, "
                             f"got {self.coupling!r}")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "d_ff",
                     "max_seq_len", "loss_chunk_size"):
            _positive_int(name, getattr(self, name))
        if self.ffn_chunk_size is not None:
            _positive_int("ffn_chunk_size", self.ffn_chunk_size)
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into num_heads={self.num_heads} heads of "
                             "even size (RoPE rotates pairs of dimensions)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        for name in ("dropout", "attention_dropout"):
            p = getattr(self, name)
            if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {p!r}")
        for name in ("norm_eps", "rope_theta", "embed_scale"):  # NaN loss, or RoPE silently off at inf
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite positive number, got {v!r}")
        for name in ("tie_embeddings", "causal", "use_flash_attention"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.attention_backend not in ("cudnn", "flash"):
            raise ValueError(f"attention_backend must be 'cudnn' or 'flash', got {self.attention_backend!r}")
        if not self.use_flash_attention:
            raise ValueError("use_flash_attention=False is not supported: attention always runs through "
                             "F.scaled_dot_product_attention, never an explicit S x S matrix; to pin a back "
                             "end use torch.nn.attention.sdpa_kernel")
        if self.stream_dtype is not None and not (isinstance(self.stream_dtype, torch.dtype)
                                                  and self.stream_dtype.is_floating_point):
            raise ValueError(f"stream_dtype must be a floating torch.dtype or None, got {self.stream_dtype!r}")
        self._validate_attention()
        if self.loss_chunk_size * self.vocab_size > INT32_MAX_NUMEL:
            raise ValueError(f"loss_chunk_size={self.loss_chunk_size} x vocab_size={self.vocab_size} = "
                             f"{self.loss_chunk_size * self.vocab_size:,} logits per chunk, more than 2^31; "
                             "use a smaller loss_chunk_size")

    def _validate_attention(self) -> None:
        from ..ops.hierarchical_attention import HierarchySpec
        from ..ops.random_features import check_kernel
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        for name in ("attention_window", "hierarchy_levels", "local_window"):
            _positive_int(name, getattr(self, name))
        HierarchySpec(self.local_window, self.compression_ratios)
        if self.hierarchy_levels != len(self.compression_ratios):
            raise ValueError(f"hierarchy_levels={self.hierarchy_levels} must equal the number of "
                             f"compression_ratios {self.compression_ratios!r}")
        check_kernel(self.rf_kernel, self.rf_num_features)
        if not isinstance(self.rf_learnable, bool):
            raise TypeError(f"rf_learnable must be a bool, got {self.rf_learnable!r}")
        if self.attention != "softmax":
            if not self.causal:
                raise ValueError(f"attention={self.attention!r} is causal only; causal=False needs 'softmax'")
            if self.attention_dropout:
                raise ValueError(f"attention={self.attention!r} has no attention dropout; got "
                                 f"attention_dropout={self.attention_dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> TransformerConfig:
        """A named shape (``PRESETS``: 'tiny', 'S', 'M', 'llama8b', and 'S-sliding_window', 'S-hierarchical',
        'S-rational_fourier') with fields replaced by ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        _check_fields(overrides, f"TransformerConfig.preset({name!r})")
        return cls(**{**PRESETS[name], **overrides})


ATTENTIONS = ("softmax", "sliding_window", "hierarchical", "rational_fourier")

PRESETS = {
    # byte-level vocabulary; d not a power of two; GQA on: for tests and demos
    "tiny": dict(vocab_size=256, num_layers=2, d_model=96, num_heads=4, num_kv_heads=2, max_seq_len=512),
    # the benchmark reference models (docs/results.md)
    "S": dict(vocab_size=32000, num_layers=24, d_model=1024, num_heads=16, d_ff=2816, max_seq_len=262144),
    "M": dict(vocab_size=32000, num_layers=24, d_model=2048, num_heads=16, d_ff=5632, max_seq_len=262144),
    "llama8b": dict(vocab_size=128256, num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8,
                    d_ff=14336, max_seq_len=131072, rope_theta=500000.0),
}
# model S with each attention variant, as the long-context benchmarks run them (up to 4M tokens)
_S_LONG = dict(PRESETS["S"], max_seq_len=4194304)
PRESETS.update({
    "S-sliding_window": dict(_S_LONG, attention="sliding_window", attention_window=4096),
    "S-hierarchical": dict(_S_LONG, attention="hierarchical", local_window=4096, hierarchy_levels=3,
                           compression_ratios=(16, 64, 256)),
    "S-rational_fourier": dict(_S_LONG, attention="rational_fourier", rf_kernel="gaussian", rf_num_features=64),
})


def resolve_config(config: TransformerConfig | None, overrides: dict, who: str,
                   **defaults) -> TransformerConfig:
    """``config`` with ``overrides`` applied, or a new config from ``defaults`` and ``overrides``."""
    _check_fields(overrides, who)
    if config is None:
        return TransformerConfig(**{**defaults, **overrides})
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"{who}: config must be a TransformerConfig, got {type(config).__name__}")
    return dataclasses.replace(config, **overrides) if overrides else config


def _check_fields(kwargs: dict, who: str) -> None:
    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"{who} got unknown arguments {unknown}; TransformerConfig fields are {sorted(names)}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(name: str, v) -> None:
    if not _is_int(v):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
