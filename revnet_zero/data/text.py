"""Text sources: one file, a folder of files, or rows of a Hugging Face ``datasets`` object.

Policy for bad files: a file named explicitly that is empty, binary (a NUL byte, or mostly control
bytes, in its first 8 KiB) or not UTF-8 is an error, and one that cannot be read raises its OSError.
Inside a folder all of these are skipped and listed in ``TextCorpus.skipped`` with the reason (callers
report the count); a folder with no usable file is an error.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SNIFF_BYTES = 8192     # how much of a file the binary test reads (git looks at as much)
MAX_CONTROL = 0.3      # more control bytes than this fraction (tab, newlines, form feed aside): binary
_TEXT_CONTROLS = b"\t\n\r\f\v\x1b"


@dataclass
class TextCorpus:
    texts: list[str]                     # one string per document
    sources: list[str]                   # where each text came from (file path or row index)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason) of unusable ones

    @property
    def num_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.texts)


def looks_binary(data: bytes) -> str | None:
    """Why ``data`` looks like a binary file (a NUL byte, or mostly control bytes, in its first
    SNIFF_BYTES), or None for text."""
    head = data[:SNIFF_BYTES]
    if b"\x00" in head:
        return f"a NUL byte at offset {head.index(0)}"
    control = sum(1 for b in head if (b < 32 and b not in _TEXT_CONTROLS) or b == 127)
    if head and control > MAX_CONTROL * len(head):
        return f"{control} of its first {len(head)} bytes are control characters"
    return None


def read_text_file(path) -> str:
    """The file's text; ValueError if it is empty (or whitespace only), binary, or not valid UTF-8;
    OSError if it cannot be read."""
    path = Path(path)
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{path} is empty ({len(data)} bytes, no text)")
    binary = looks_binary(data)
    if binary:
        raise ValueError(f"{path} looks binary, not text: {binary}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: byte {data[e.start]:#04x} at offset {e.start} "
                         f"({e.reason})") from None


def read_texts(files: Iterable, max_chars: int | None = None) -> TextCorpus:
    """Read ``files`` in the order given, skipping unusable ones, until ``max_chars`` characters are read."""
    corpus = TextCorpus([], [])
    total = 0
    for f in files:
        try:
            text = read_text_file(f)
        except ValueError as e:
            corpus.skipped.append((str(f), str(e)))
            continue
        except OSError as e:  # unreadable (permissions, I/O error): one bad file need not stop a corpus
            corpus.skipped.append((str(f), f"{f} cannot be read: {e.strerror or e}"))
            continue
        corpus.texts.append(text)
        corpus.sources.append(str(f))
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return corpus


def text_files(path, pattern: str = "**/*.txt", max_chars: int | None = None) -> TextCorpus:
    """Texts of one file, or of the files under a folder matching ``pattern`` (recursive with ``**``),
    in sorted path order."""
    path = Path(path)
    if path.is_file():
        return TextCorpus([read_text_file(path)], [str(path)])
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or folder: {path}")
    files = sorted(p for p in path.glob(pattern) if p.is_file())
    corpus = read_texts(files, max_chars)
    if not corpus.texts:
        why = f"; e.g. {corpus.skipped[0][1]}" if corpus.skipped else ""
        raise ValueError(f"no usable text in {path} with pattern {pattern!r}: {len(files)} files matched, "
                         f"{len(corpus.skipped)} skipped as empty, binary, unreadable or not UTF-8{why}")
    return corpus


def dataset_texts(rows, text_field: str = "text") -> TextCorpus:
    """Texts of a Hugging Face ``datasets.Dataset`` (or any iterable of dicts), from column ``text_field``.
    Rows whose text is empty or not a string are skipped and listed."""
    corpus = TextCorpus([], [])
    for i, row in enumerate(rows):
        if text_field not in row:
            raise ValueError(f"row {i} has no field {text_field!r}; its fields are {sorted(row)}")
        text = row[text_field]
        if not isinstance(text, str) or not text.strip():
            corpus.skipped.append((f"row {i}", f"{text_field!r} is {type(text).__name__} {text!r:.40}"))
            continue
        corpus.texts.append(text)
        corpus.sources.append(f"row {i}")
    if not corpus.texts:
        raise ValueError(f"no usable text in the {text_field!r} field of {len(corpus.skipped)} rows")
    return corpus


def load_hf_dataset(name: str, split: str = "train", text_field: str = "text", **kwargs) -> TextCorpus:
    """``datasets.load_dataset(name, split=split, **kwargs)`` as a TextCorpus (needs ``datasets``)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"loading {name!r} needs the Hugging Face datasets package: pip install datasets") from e
    return dataset_texts(datasets.load_dataset(name, split=split, **kwargs), text_field)
