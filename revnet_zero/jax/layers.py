"""The sub-functions of a block as pure functions of a parameter dict (the PyTorch layers' math).

Linear weights are stored ``[in, out]`` (JAX's convention; PyTorch's ``nn.Linear`` stores ``[out, in]``,
see ``weights.py``). Every function takes the float32 stream, normalises it in float32, runs its matmuls in
``dtype`` and returns its output in float32, so the two streams stay float32 whatever ``dtype`` is.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

ACTIVATIONS = {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}  # torch's exact gelu
FFN_ACTIVATION = {"swiglu": ("silu", True), "geglu": ("gelu", True), "gelu": ("gelu", False)}
ATTENTION_NAME = "attention"   # checkpoint_name of the attention output, for the remat policies that keep it


def rms_norm(x, weight, eps: float, dtype):
    """``x / rms(x) * weight`` over the last dim, computed in float32 (float64 for float64 ``x``), in ``dtype``."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(acc)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * weight.astype(acc)
    return y.astype(dtype)


def rope_tables(length: int, head_dim: int, theta: float):
    """cos and sin ``[length, head_dim / 2]`` float32 for positions ``0 .. length - 1``.

    Angles formed in float64 with numpy at trace time (a float32 angle is off by up to 0.06 rad at
    position 2M), as ``revnet_zero.layers.rope``; they enter the program as constants.
    """
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(length, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x, cos, sin):
    """Rotate ``x`` ``[B, S, H, hd]``: dimension i with i + hd/2 (the Llama / Hugging Face layout), in x's dtype."""
    a, b = jnp.split(x, 2, axis=-1)
    c, s = cos[None, :, None, :].astype(x.dtype), sin[None, :, None, :].astype(x.dtype)
    return jnp.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def dropout(x, rate: float, key):
    """Inverted dropout; identity when ``key`` is None or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def attention(p: dict, x, key, *, num_heads: int, num_kv_heads: int, theta: float, eps: float, dtype,
              rate: float = 0.0, implementation: str | None = None):
    """RMSNorm -> q, k, v (GQA) -> RoPE -> causal ``jax.nn.dot_product_attention`` -> out projection.

    ``p``: ``norm [D], wq [D, H*hd], wk [D, Hkv*hd], wv [D, Hkv*hd], wo [D, D]``; ``x`` ``[B, S, D]`` -> ``[B, S, D]``.
    ``theta``: the RoPE base.
    """
    B, S, D = x.shape
    hd = D // num_heads
    h = rms_norm(x, p["norm"], eps, dtype)
    q = (h @ p["wq"].astype(dtype)).reshape(B, S, num_heads, hd)
    k = (h @ p["wk"].astype(dtype)).reshape(B, S, num_kv_heads, hd)
    v = (h @ p["wv"].astype(dtype)).reshape(B, S, num_kv_heads, hd)
    rope = rope_tables(S, hd, theta)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    o = checkpoint_name(o, ATTENTION_NAME)                                   # [B, S, H, hd]
    y = o.reshape(B, S, D) @ p["wo"].astype(dtype)
    return dropout(y, rate, key).astype(x.dtype)


def feed_forward(p: dict, x, key, *, kind: str, eps: float, dtype, rate: float = 0.0,
                 chunk: int | None = None):
    """RMSNorm -> ``act(x W_gate) * (x W_up)`` (gated) or ``act(x W_in)`` -> ``W_out``.

    ``p``: ``norm [D], w_in [D, 2*F]`` (gated: columns ``[gate | up]``) or ``[D, F]``, ``w_out [F, D]``.
    ``chunk``: positions per tile when it divides S (< S): the tiles run under ``lax.map`` with their
    intermediates rematerialised, so ``[B, S, F]`` never exists whole (as the PyTorch ``seq_chunk``).
    """
    activation, gated = FFN_ACTIVATION[kind]
    act = ACTIVATIONS[activation]

    def tile(xt):
        h = rms_norm(xt, p["norm"], eps, dtype) @ p["w_in"].astype(dtype)
        if gated:
            gate, up = jnp.split(h, 2, axis=-1)
            h = act(gate) * up
        else:
            h = act(h)
        return h @ p["w_out"].astype(dtype)

    B, S, D = x.shape
    if chunk is not None and chunk < S and S % chunk == 0:
        tiles = x.reshape(B, S // chunk, chunk, D).swapaxes(0, 1)              # [n, B, chunk, D]
        y = jax.lax.map(jax.checkpoint(tile), tiles).swapaxes(0, 1).reshape(B, S, -1)
    else:
        y = tile(x)
    return dropout(y, rate, key).astype(x.dtype)
