"""Tokenizers: a built-in byte-level one, and an adapter for Hugging Face tokenizers.

Every tokenizer here has ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size`` and
``eos_id`` (the id that separates documents when they are packed together).
"""
from __future__ import annotations

from collections.abc import Iterable


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then the specials EOS (256), BOS (257) and PAD (258).

    Needs no vocabulary file and encodes any text. ``decode`` drops the specials and replaces byte
    sequences that are not valid UTF-8 (a sampled model can emit them) with U+FFFD.

    Example::

        tok = ByteTokenizer()
        ids = tok.encode("héllo", add_eos=True)   # [104, 195, 169, 108, 108, 111, 256]
        tok.decode(ids)                            # 'héllo'
    """

    eos_id, bos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode takes a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """Adapts a Hugging Face tokenizer (anything with ``encode``/``decode``) to the interface above.

    ``encode`` adds no special tokens of its own; documents are separated by ``eos_id``, taken from the
    tokenizer's ``eos_token_id`` (or ``sep_token_id``), or given explicitly.
    """

    def __init__(self, tokenizer, eos_id: int | None = None):
        for attr in ("encode", "decode"):
            if not callable(getattr(tokenizer, attr, None)):
                raise TypeError(f"a tokenizer needs a callable .{attr}(), {type(tokenizer).__name__} has none")
        self.tokenizer = tokenizer
        if eos_id is None:
            eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is None:
            eos_id = getattr(tokenizer, "sep_token_id", None)
        if eos_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no eos_token_id or sep_token_id; pass eos_id=")
        self.eos_id = int(eos_id)
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)
        if size is None:
            raise ValueError(f"cannot tell the vocabulary size of {type(tokenizer).__name__}: it has neither "
                             "len() nor .vocab_size")
        self.vocab_size = int(size)

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(spec="byte"):
    """``'byte'`` -> ByteTokenizer; a Hugging Face name or path -> ``AutoTokenizer.from_pretrained(spec)``
    (needs ``transformers``); a tokenizer object -> returned as is if it already fits, else adapted."""
    if isinstance(spec, str):
        if spec == "byte":
            return ByteTokenizer()
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError(f"tokenizer {spec!r} is a Hugging Face tokenizer, which needs transformers: "
                              "pip install transformers") from e
        return HFTokenizer(AutoTokenizer.from_pretrained(spec))
    if all(hasattr(spec, a) for a in ("encode", "decode", "eos_id", "vocab_size")):
        return spec
    return HFTokenizer(spec)
