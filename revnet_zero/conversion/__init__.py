"""Pretrained Hugging Face decoder models made reversible (BDIA, exact) or two-stream (with a reported gap).

Imports only torch: ``transformers`` is needed only to build the models passed in.
"""
from .convert import ConversionReport, bdia_reference, convert_from_reversible, convert_to_reversible
from .two_stream import ScaledCoupling

__all__ = ["ConversionReport", "ScaledCoupling", "bdia_reference", "convert_from_reversible",
           "convert_to_reversible"]
