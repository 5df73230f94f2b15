"""Data: tokenizers, text sources, packing into fixed-length sequences, resumable batches."""
from .packing import Batches, PackedDataset, collate
from .text import TextCorpus, dataset_texts, load_hf_dataset, read_text_file, read_texts, text_files
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["Batches", "ByteTokenizer", "HFTokenizer", "PackedDataset", "TextCorpus", "collate",
           "dataset_texts", "load_hf_dataset", "load_tokenizer", "read_text_file", "read_texts", "text_files"]
