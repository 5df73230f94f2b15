"""Cross-entropy of a linear head a chunk of tokens at a time: the ``[N, V]`` logits never exist."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def linear_cross_entropy(hidden, head, targets, chunk_size: int, dtype, ignore_index: int = -100):
    """Mean cross-entropy of ``hidden @ head`` over the targets that are not ``ignore_index``.

    hidden ``[N, D]``, head ``[D, V]``, targets ``[N]`` (ints in ``[0, V)`` or ``ignore_index``). The tokens
    run ``chunk_size`` at a time under ``lax.scan``; each chunk is rematerialised (``jax.checkpoint``), so
    the backward rebuilds one ``[chunk, V]`` logits block at a time instead of keeping them all. Matmul in
    ``dtype``, softmax in float32; ``nan`` when every target is ignored (as ``F.cross_entropy``).

    Example::

        loss = linear_cross_entropy(jnp.ones((10, 8)), jnp.ones((8, 50)), jnp.arange(10), 4, jnp.float32)
    """
    N, D = hidden.shape
    C = min(chunk_size, N)
    n = -(-N // C)
    pad = n * C - N
    h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(n, C, D)
    t = jnp.pad(targets, (0, pad), constant_values=ignore_index).reshape(n, C)
    acc = jnp.promote_types(hidden.dtype, jnp.float32)

    @jax.checkpoint
    def chunk(hc, tc):
        logits = (hc.astype(dtype) @ head.astype(dtype)).astype(acc)              # [C, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, jnp.clip(tc, 0)[:, None], axis=1)[:, 0]
        return jnp.sum(jnp.where(tc != ignore_index, lse - picked, 0.0))

    total, _ = jax.lax.scan(lambda s, ht: (s + chunk(*ht), None), jnp.zeros((), acc), (h, t))
    return total / jnp.sum(targets != ignore_index).astype(acc)
