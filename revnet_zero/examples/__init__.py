"""Runnable examples as importable classes: long-context pretraining on local text (``LongContextPretraining``)
and document question answering with a converted pretrained-architecture model (``DocumentQA``, needs the
``[hf]`` extra). The scripts in the repository's ``examples/`` folder drive them from the command line."""
from __future__ import annotations

from .pretraining import LongContextPretraining, PretrainingConfig

__all__ = ["DocumentQA", "DocumentQAConfig", "LongContextPretraining", "PretrainingConfig"]


def __getattr__(name: str):
    # DocumentQA imports transformers; load it only when asked for, so this package imports with torch alone
    if name in ("DocumentQA", "DocumentQAConfig"):
        from . import document_qa
        return getattr(document_qa, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
