"""Checkpoints: tied weights, atomic writes, unreadable files, checkpoints of another architecture."""
import os

import pytest
import torch

from revnet_zero.models import ReversibleGPT, TransformerConfig
from revnet_zero.training import (latest_checkpoint, load_checkpoint, load_weights, read_weights, save_checkpoint,
                                  save_weights)
from revnet_zero.training import checkpoint as ckpt

pytest.importorskip("safetensors")


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return ReversibleGPT(TransformerConfig.preset("tiny", **overrides))


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tied_weights_are_written_once_and_stay_tied(tmp_path):
    model, other = tiny(0, tie_embeddings=True), tiny(1, tie_embeddings=True)
    save_weights(model, tmp_path / "w.safetensors", {"note": {"n": 1}})
    tensors, meta = read_weights(tmp_path / "w.safetensors")
    assert meta == {"note": {"n": 1}}
    assert tensors["head.weight"] is tensors["embed.weight"]  # one stored copy, aliased back
    load_weights(other, tmp_path / "w.safetensors")
    assert_same_weights(model, other)
    assert other.head.weight is other.embed.weight


def test_checkpoint_round_trip_and_only_the_newest_are_kept(tmp_path):
    model = tiny()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002", "step-000003"]
    assert latest_checkpoint(tmp_path).name == "step-000003"
    fresh = tiny(seed=5)
    assert load_checkpoint(tmp_path, fresh) == {"step": 3}
    assert_same_weights(model, fresh)


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny()
    save_checkpoint(tmp_path, 1, model, {"step": 1})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def dies_half_way(obj, path):  # writes part of the file, then the process "dies"
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ckpt.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, {"step": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert not [p for p in tmp_path.rglob(".*tmp*")]  # no temporary file left behind
    fresh = tiny(seed=3)
    assert load_checkpoint(tmp_path, fresh) == {"step": 1}
    assert_same_weights(tiny(), fresh)


def test_atomic_write_never_exposes_a_partial_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old and complete")

    def partial(tmp):
        tmp.write_bytes(b"new but")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write(target, partial)
    assert target.read_bytes() == b"old and complete" and os.listdir(tmp_path) == ["f.bin"]


def test_truncated_files_give_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, tiny(), {"step": 1, "x": torch.ones(1000)})
    weights, state = path / "model.safetensors", path / "trainer.pt"
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"checksum mismatch in .*trainer\.pt"):
        load_checkpoint(tmp_path, tiny())
    (path / "checksums.json").unlink()  # a checkpoint from before checksums: the readers still say why
    with pytest.warns(UserWarning, match="not verified"), \
            pytest.raises(ValueError, match=r"cannot read trainer state .*trainer\.pt.*truncated"):
        load_checkpoint(tmp_path, tiny())
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="not verified"), \
            pytest.raises(ValueError, match=r"cannot read weights .*model\.safetensors.*truncated"):
        load_checkpoint(tmp_path, tiny())


def test_checkpoint_of_another_architecture_names_tensor_and_both_shapes(tmp_path):
    save_checkpoint(tmp_path, 1, tiny(), {"step": 1})
    other = tiny(d_model=64)
    shapes = r"embed\.weight: checkpoint has shape \(256, 96\), model has \(256, 64\)"
    with pytest.raises(ValueError, match=shapes):
        load_checkpoint(tmp_path, other)
    deeper = tiny(num_layers=3)
    with pytest.raises(ValueError, match=r"missing blocks\.blocks\.2\."):
        load_checkpoint(tmp_path, deeper)


def test_loading_from_a_folder_without_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path, tiny())
