"""RevNet-Zero in JAX/Flax (extra ``[jax]``): the reversible stack as one ``jax.custom_vjp``, the
``ReversibleTransformerJAX`` model (Flax linen), ``JAXMemoryScheduler``, and weights shared with PyTorch.

Example::

    import jax, jax.numpy as jnp
    from revnet_zero.jax import ReversibleTransformerJAX
    model = ReversibleTransformerJAX(vocab_size=256, num_layers=2, d_model=64, num_heads=4, use_scan=True)
    ids = jnp.zeros((1, 16), jnp.int32)
    params = model.init(jax.random.key(0), ids)
    out = model.apply(params, ids)          # out.loss, out.logits [1, 16, 256]
"""
try:
    import flax  # noqa: F401
    import jax  # noqa: F401  (absolute: this package is revnet_zero.jax, Python 3 has no implicit relative imports)
    import optax  # noqa: F401
except ImportError as e:
    raise ImportError(f"revnet_zero.jax needs jax, flax and optax ({e.name} is missing): "
                      "pip install 'revnet-zero[jax]'") from e

from .model import JAXOutput, ReversibleTransformerJAX
from .reversible import plain_stack, reversible_stack
from .scheduler import REMAT_POLICIES, JAXMemoryScheduler
from .weights import (
    from_torch_state_dict,
    load_torch_weights,
    save_torch_weights,
    to_torch_state_dict,
)

__all__ = [
    "REMAT_POLICIES",
    "JAXMemoryScheduler",
    "JAXOutput",
    "ReversibleTransformerJAX",
    "from_torch_state_dict",
    "load_torch_weights",
    "plain_stack",
    "reversible_stack",
    "save_torch_weights",
    "to_torch_state_dict",
]
