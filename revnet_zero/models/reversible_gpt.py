"""``ReversibleGPT``: the causal decoder under its GPT name."""
from __future__ import annotations

from .reversible_transformer import ReversibleTransformer


class ReversibleGPT(ReversibleTransformer):
    """The causal decoder ``ReversibleTransformer`` under its GPT name: same constructor, forward, generate.

    Example::

        model = ReversibleGPT(TransformerConfig.preset("tiny"))
        loss = model(torch.randint(0, 256, (2, 33))).loss
    """
