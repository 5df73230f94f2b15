"""The reversible bidirectional encoder with a masked-LM head."""
from __future__ import annotations

from .reversible_transformer import ReversibleLM


class ReversibleBERT(ReversibleLM):
    """Bidirectional reversible encoder with a masked-language-model head.

    ``ReversibleBERT(config=None, **overrides)`` (``causal`` defaults to False here). ``forward(input_ids
    [B, S], labels=None, attention_mask=None, return_logits=None)``: ``attention_mask`` ``[B, S]`` (1 =
    token, 0 = padding) is passed to SDPA as a boolean key mask, so padded keys are ignored; every row
    needs at least one token. ``.loss`` is the cross-entropy of ``labels`` at the same positions (no
    shift; ``-100`` ignored, e.g. at unmasked positions); ``None`` without labels.

    Example::

        model = ReversibleBERT(TransformerConfig.preset("tiny", causal=False))
        ids = torch.randint(0, 256, (2, 17))
        labels = torch.full_like(ids, -100)
        labels[:, 3] = ids[:, 3]
        ids[:, 3] = 0                                   # the [MASK] id of your tokenizer
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0                                # row 1 is padded
        out = model(ids, labels=labels, attention_mask=mask)
        out.loss.backward()
    """

    causal = False

    def _block_kwargs(self, attention_mask):
        if attention_mask is None:
            return {}
        empty = attention_mask.sum(dim=1) == 0
        if bool(empty.any()):
            raise ValueError(f"attention_mask rows {empty.nonzero().flatten().tolist()[:8]} have no tokens; "
                             "their attention would be undefined (nan)")
        if bool(attention_mask.all()):
            return {}                                   # no padding: the unmasked (flash) path
        return {"attention_mask": attention_mask}

    def _targets(self, input_ids, labels, attention_mask):
        return None if labels is None else labels.long()
