"""Tokenizers, text sources, packing and resumable batches."""
import pytest
import torch

from revnet_zero.data import (Batches, ByteTokenizer, HFTokenizer, PackedDataset, dataset_texts, load_tokenizer,
                              read_text_file, text_files)


def test_byte_tokenizer_round_trips_any_unicode_and_appends_eos():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓ 🐍\n\ttabs"
    ids = tok.encode(text, add_eos=True)
    assert ids[-1] == tok.eos_id == 256 and all(0 <= i < 256 for i in ids[:-1])
    assert tok.decode(ids) == text
    assert tok.vocab_size == 259


def test_byte_tokenizer_decode_replaces_broken_utf8_and_rejects_out_of_range_ids():
    tok = ByteTokenizer()
    assert tok.decode([0xC3]) == "\ufffd"  # a lone lead byte, as a sampled model may emit
    with pytest.raises(ValueError, match="259"):
        tok.decode([104, 259])


class FakeHFTokenizer:
    """What the adapter needs of a Hugging Face tokenizer: encode/decode, eos_token_id, len()."""
    eos_token_id = 3

    def encode(self, text, add_special_tokens=True):
        return [10 + ord(c) - ord("a") for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i - 10 + ord("a")) for i in ids if i >= 10)

    def __len__(self):
        return 36


def test_hf_tokenizer_is_adapted_with_its_eos_and_vocab_size():
    tok = load_tokenizer(FakeHFTokenizer())
    assert isinstance(tok, HFTokenizer) and tok.eos_id == 3 and tok.vocab_size == 36
    assert tok.encode("abc", add_eos=True) == [10, 11, 12, 3]
    assert tok.decode([10, 11, 3]) == "ab"


def test_tokenizer_without_eos_is_refused():
    class NoEos(FakeHFTokenizer):
        eos_token_id = None
    with pytest.raises(ValueError, match="eos_id"):
        HFTokenizer(NoEos())


def test_empty_and_non_utf8_files_are_errors_naming_the_file(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        read_text_file(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text: byte 0xe9 at offset 3"):
        text_files(tmp_path / "latin1.txt")


def test_folder_is_globbed_recursively_and_bad_files_are_skipped_and_listed(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "b.txt").write_text("second")
    (tmp_path / "sub" / "c.md").write_text("not matched")
    (tmp_path / "sub" / "empty.txt").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    corpus = text_files(tmp_path, "**/*.txt")
    assert corpus.texts == ["first", "second"]
    assert sorted(s.rsplit("/", 1)[-1] for s, _ in corpus.skipped) == ["bad.txt", "empty.txt"]


def test_binary_files_are_refused_by_name_and_skipped_in_a_folder(tmp_path):
    (tmp_path / "nul.txt").write_bytes(b"\x00" * 4096)
    (tmp_path / "ctrl.txt").write_bytes(bytes(range(1, 9)) * 100 + b"some text")
    (tmp_path / "ok.txt").write_text("plain text,\twith tabs\r\nand \x1b[1mbold\x1b[0m escapes\f")
    with pytest.raises(ValueError, match=r"nul\.txt looks binary, not text: a NUL byte at offset 0"):
        read_text_file(tmp_path / "nul.txt")
    with pytest.raises(ValueError, match=r"ctrl\.txt looks binary, not text: 800 of its first 809 bytes"):
        text_files(tmp_path / "ctrl.txt")
    corpus = text_files(tmp_path)
    assert corpus.sources == [str(tmp_path / "ok.txt")]
    assert sorted(s.rsplit("/", 1)[-1] for s, _ in corpus.skipped) == ["ctrl.txt", "nul.txt"]


def test_an_unreadable_file_in_a_folder_is_skipped_and_reported(tmp_path, monkeypatch):
    import errno
    from pathlib import Path
    for name in ("a.txt", "locked.txt", "z.txt"):
        (tmp_path / name).write_text(f"text of {name}")
    read = Path.read_bytes

    def refuse_locked(self):  # as chmod 000 would for a user other than root
        if self.name == "locked.txt":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return read(self)
    monkeypatch.setattr(Path, "read_bytes", refuse_locked)
    corpus = text_files(tmp_path)
    assert corpus.texts == ["text of a.txt", "text of z.txt"]
    assert corpus.skipped == [(str(tmp_path / "locked.txt"), f"{tmp_path / 'locked.txt'} cannot be read: "
                                                             "Permission denied")]
    with pytest.raises(PermissionError):
        text_files(tmp_path / "locked.txt")  # named explicitly: the error itself


def test_folder_without_usable_files_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"1 files matched, 1 skipped"):
        text_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        text_files(tmp_path / "nowhere")


def test_rows_of_a_dataset_object_are_read_from_the_text_field():
    rows = [{"text": "one"}, {"text": ""}, {"text": "two"}, {"text": None}]
    corpus = dataset_texts(rows)
    assert corpus.texts == ["one", "two"] and len(corpus.skipped) == 2
    with pytest.raises(ValueError, match=r"no field 'content'; its fields are \['text'\]"):
        dataset_texts(rows, text_field="content")


def test_packing_joins_documents_with_eos_and_cuts_fixed_lengths():
    tok = ByteTokenizer()
    ds = PackedDataset.from_texts(["ab", "cde", "f"], tok, seq_len=3)
    # stream: a b EOS c d e EOS f EOS  -> 3 sequences of 3
    assert len(ds) == 3
    assert ds[0].tolist() == [97, 98, 256] and ds[1].tolist() == [99, 100, 101]
    assert ds[2].tolist() == [256, 102, 256] and ds[0].dtype == torch.long
    train, val = ds.split(0.34)
    assert len(train) == 1 and len(val) == 2 and val[0].tolist() == [99, 100, 101]


def test_packing_too_little_text_is_an_error_quoting_the_counts():
    with pytest.raises(ValueError, match=r"3 tokens do not fill one sequence of seq_len=8"):
        PackedDataset.from_texts(["ab"], ByteTokenizer(), seq_len=8)


def _dataset(n=20, s=4):
    return PackedDataset(torch.arange(n * s), s)


def _firsts(batches):
    return [b[:, 0].tolist() for b in batches]


def test_batches_are_shuffled_by_the_seed_alone():
    torch.manual_seed(123)
    a = _firsts(Batches(_dataset(), 4, seed=7))
    torch.manual_seed(999)  # the global RNG plays no part
    assert a == _firsts(Batches(_dataset(), 4, seed=7))
    assert a != _firsts(Batches(_dataset(), 4, seed=8))
    assert sorted(x for b in a for x in b) == list(range(0, 80, 4))


def test_batches_resume_from_a_saved_position_across_epochs():
    full = Batches(_dataset(), 3, seed=1)
    straight = _firsts(full) + _firsts(full)          # two epochs
    first = Batches(_dataset(), 3, seed=1)
    it = iter(first)
    head = [next(it)[:, 0].tolist() for _ in range(4)]
    state = first.state_dict()
    resumed = Batches(_dataset(), 3, seed=1)
    resumed.load_state_dict(state)
    assert head + _firsts(resumed) + _firsts(resumed) == straight
    with pytest.raises(ValueError, match="seed=1"):
        Batches(_dataset(), 3, seed=2).load_state_dict(state)


def test_batches_shard_by_rank_without_overlap():
    parts = [_firsts(Batches(_dataset(), 2, seed=0, rank=r, world_size=2)) for r in range(2)]
    seen = [x for p in parts for b in p for x in b]
    assert len(seen) == len(set(seen)) == 20
