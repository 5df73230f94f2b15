"""Self-attention as a coupling sub-function, and the reversible attention layer built on it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..couplings import CouplingType, StepCoupling, make_coupling
from ..engine import ReversibleBlock
from ..ops import kept_attention
from ..ops.limits import INT32_MAX_NUMEL, check_int32_numel
from ..ops.norm import compute_dtype
from .rope import norm_rope, rope_cos_sin


class KVCache:
    """Keys and values of one attention layer for incremental decoding, ``[B, Hkv, max_len, hd]``.

    Allocated at the first ``update``; ``length`` is the number of positions written so far.
    """

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k``, ``v`` ``[B, Hkv, T, hd]``; return all keys and values so far."""
        if self.k is None:
            shape = (*k.shape[:2], self.max_len, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} positions; cannot write up to position {end}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class SelfAttention(nn.Module):
    """RMSNorm -> q, k, v projections (GQA) -> RoPE -> ``F.scaled_dot_product_attention`` -> out projection.

    ``[B, S, D] -> [B, S, out_multiplier * D]`` (``out_multiplier = 2`` feeds an affine coupling).
    The S x S score matrix is never formed by this code: SDPA picks a flash / cuDNN / efficient kernel on
    GPU (on CPU PyTorch may use its math back end, which does form it). ``attention_mask`` ``[B, S]``
    (1 = keep, 0 = padding) is a key-padding mask for bidirectional attention; causal attention takes
    none (a causal padding mask would need an S x S mask: right-pad and mask the loss instead).
    ``sdpa_backend``: the SDPA kernel reversible blocks call directly on CUDA in bf16/fp16, the same
    in forward and recompute (``'cudnn'`` or ``'flash'``; see ``ops/kept_attention.py``).

    Example::

        attn = SelfAttention(d_model=96, num_heads=4, num_kv_heads=2)
        y = attn(torch.randn(2, 11, 96))            # [2, 11, 96]
    """

    kernels = "torch"   # norm and rotary: 'torch', or 'liger' (Liger-Kernel's, on CUDA; layers.rope.norm_rope)

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None, causal: bool = True,
                 rope_theta: float = 10000.0, attention_dropout: float = 0.0, dropout: float = 0.0,
                 norm_eps: float = 1e-5, out_multiplier: int = 1, sdpa_backend: str = "cudnn"):
        super().__init__()
        if sdpa_backend not in kept_attention.CUDA_BACKENDS:
            raise ValueError(f"sdpa_backend must be one of {kept_attention.CUDA_BACKENDS}, got {sdpa_backend!r}")
        self.sdpa_backend = sdpa_backend
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if d_model % num_heads or (d_model // num_heads) % 2:
            raise ValueError(f"d_model={d_model} must split into num_heads={num_heads} heads of even size "
                             "(RoPE rotates pairs of dimensions)")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, d_model // num_heads
        self.causal, self.rope_theta, self.attention_dropout = causal, rope_theta, attention_dropout
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(d_model, out_multiplier * d_model, bias=False)
        self.drop = nn.Dropout(dropout)
        self.sequence_parallel = None   # a SequenceParallel: this rank holds S/N positions (distributed/)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, cache: KVCache | None = None,
                **kwargs) -> Tensor:
        B, S, D = x.shape
        check_int32_numel(B * S * self.wo.out_features, f"the attention output [B={B}, S={S}, "
                          f"{self.wo.out_features}]", "Use a shorter sequence or a smaller batch.")
        sp = self.sequence_parallel
        start = cache.length if cache is not None else 0
        if sp is not None:
            if cache is not None:
                raise ValueError("decoding with a KV cache runs on one process; call "
                                 "revnet_zero.distributed.disable_sequence_parallel(model) first")
            start = sp.local_spans(S * sp.size)   # this rank's positions in the whole sequence
        q, k, v = self.project(x, start)
        if cache is not None:
            if start > 0 and S > 1:
                raise ValueError(f"the KV cache takes a prompt then one token at a time; got {S} tokens "
                                 f"at position {start}")
            k, v = cache.update(k, v)
        if sp is not None:
            y = self._attend_sequence_parallel(q, k, v, attention_mask, sp)
        else:
            y = self._attend(q, k, v, attention_mask, is_causal=self.causal and start == 0)
        y = y.transpose(1, 2).reshape(B, S, D)                                          # (B, S, D)
        return self.drop(self.wo(y))

    def _attend_sequence_parallel(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None, sp):
        """Attention of this rank's queries ``[B, H, S/N, hd]`` over the whole sequence (exact)."""
        from ..distributed import sequence_parallel as spm
        if sp.mode == "ring":
            if attention_mask is not None:
                raise ValueError("ring sequence parallelism runs attention without a mask; batch sequences of "
                                 "one length (no padding) or use mode='all_to_all'")
            dropout_p = self.attention_dropout if self.training else 0.0   # GQA: attention() repeats k, v
            return kept_attention.attention(q, k, v, is_causal=self.causal, dropout_p=dropout_p,
                                            cuda_backend=self.sdpa_backend, ring=sp)
        if sp.mode == "all_to_all":
            if self.num_kv_heads % sp.size:   # fewer key/value heads than ranks: split them as MHA
                k, v = spm.repeat_kv(k, self.num_heads), spm.repeat_kv(v, self.num_heads)
            q, k, v = (spm.seq_to_heads(t, sp) for t in (q, k, v))
            return spm.heads_to_seq(self._attend(q, k, v, attention_mask, is_causal=self.causal), sp)
        if attention_mask is not None or not self.causal:
            raise ValueError("all_gather sequence parallelism is for causal attention without a mask")
        L = q.shape[2]
        end = (sp.rank + 1) * L   # keys after this rank's last query are masked anyway: not attended
        k, v = (spm.repeat_kv(spm.gather_seq(t, sp)[:, :, :end], self.num_heads) for t in (k, v))
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(L, end) if end > L else None
        dropout_p = self.attention_dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=mask is None)

    def project(self, x: Tensor, start: int | tuple[tuple[int, int], ...] = 0) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``[B, S, D]`` (positions ``start ..``, or ``(first, count)`` spans) -> RoPE'd
        q ``[B, H, S, hd]``, k and v ``[B, Hkv, S, hd]``."""
        B, S, _ = x.shape
        # one low-precision copy of the normed stream feeds q, k and v (autocast would make three)
        norm, rope = norm_rope(self.kernels)
        h = norm(x, self.norm.weight, self.norm.eps, compute_dtype(self.norm.weight))
        q = self.wq(h).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)       # (B, H, S, hd)
        k = self.wk(h).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)    # (B, Hkv, S, hd)
        v = self.wv(h).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(start, S, self.head_dim, self.rope_theta, x.device)
        q, k = rope(q, k, cos, sin)
        return q, k, v

    def new_cache(self, max_len: int) -> KVCache:
        """The decoding cache this attention reads: all keys and values."""
        return KVCache(max_len)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None, is_causal: bool):
        dropout_p = self.attention_dropout if self.training else 0.0
        if attention_mask is None:   # through kept_attention, so the kept-attention policies apply
            return kept_attention.attention(q, k, v, is_causal=is_causal, dropout_p=dropout_p,
                                            cuda_backend=self.sdpa_backend)
        if self.causal:
            raise ValueError("causal attention takes no attention_mask (it would need an S x S mask); "
                             "right-pad the batch and set the padded labels to -100")
        if attention_mask.shape != (q.shape[0], k.shape[2]):
            raise ValueError(f"attention_mask must be [B, S] = [{q.shape[0]}, {k.shape[2]}], got "
                             f"{tuple(attention_mask.shape)}")
        mask = attention_mask.bool()[:, None, None, :]                                  # (B, 1, 1, S)
        # Masked kernels (efficient back end) index query x key scores with 32 bits
        # (pytorch#187227, #147585): attend in query tiles of fewer than 2^31 scores each. Exact,
        # since every query row is independent.
        tile = max(1, (INT32_MAX_NUMEL - 1) // k.shape[2])
        extra = {"enable_gqa": True} if self.num_kv_heads != self.num_heads else {}
        outs = [F.scaled_dot_product_attention(qt, k, v, attn_mask=mask, dropout_p=dropout_p, **extra)
                for qt in q.split(tile, dim=2)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class ReversibleAttention(ReversibleBlock):
    """A reversible half block: ``y1 = x1 + Attn(x2)``, ``y2 = x2`` (affine: ``y1 = x1 * s + t``).

    Followed by a ``ReversibleFFN`` (``y2 = x2 + FFN(y1)``) it is one standard reversible transformer
    block. Call it with one tensor ``[B, S, D]`` (taken as both streams) or two; it returns the pair of
    streams. ``coupling``: a ``CouplingType``, its name, or a fresh ``StepCoupling`` without ``f``.
    ``use_rational_attention=True``: ``RationalFourierAttention`` (random-feature kernel attention, linear
    in S; causal only) in place of exact attention; ``rational_options`` go to it
    (``num_fourier_features``, ``kernel``, ``learnable_features``, ``seed``).

    Example::

        layer = ReversibleAttention(d_model=96, num_heads=4, coupling=CouplingType.ADDITIVE)
        hidden_states, coupling_output = layer(torch.randn(2, 11, 96))
        linear = ReversibleAttention(96, 4, use_rational_attention=True, num_fourier_features=32)
    """

    def __init__(self, d_model: int, num_heads: int,
                 coupling: CouplingType | str | StepCoupling = CouplingType.ADDITIVE,
                 use_rational_attention: bool = False, attention_dropout: float = 0.0, *,
                 num_kv_heads: int | None = None, causal: bool = True, dropout: float = 0.0,
                 rope_theta: float = 10000.0, norm_eps: float = 1e-5, policy: str = "recompute",
                 sdpa_backend: str = "cudnn", **rational_options):
        c = make_coupling(coupling)
        if rational_options and not use_rational_attention:
            raise TypeError(f"ReversibleAttention got {sorted(rational_options)}, which only "
                            "use_rational_attention=True takes")
        if use_rational_attention:
            from .attention_variants import RationalFourierAttention
            attn = RationalFourierAttention(d_model, num_heads, num_kv_heads=num_kv_heads, causal=causal,
                                            rope_theta=rope_theta, attention_dropout=attention_dropout,
                                            dropout=dropout, norm_eps=norm_eps, out_multiplier=c.out_multiplier,
                                            **rational_options)
        else:
            attn = SelfAttention(d_model, num_heads, num_kv_heads, causal, rope_theta, attention_dropout,
                                 dropout, norm_eps, out_multiplier=c.out_multiplier, sdpa_backend=sdpa_backend)
        super().__init__(make_coupling(c, f=attn), policy=policy)

    @property
    def attention(self) -> SelfAttention:
        return self.coupling.f

    def forward(self, x1: Tensor, x2: Tensor | None = None, _tape=None, **kwargs) -> tuple[Tensor, Tensor]:
        return super().forward(x1, x1 if x2 is None else x2, _tape=_tape, **kwargs)
