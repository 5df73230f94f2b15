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


def _trainer_checkpoint(tmp_path, model):
    from revnet_zero.training import Trainer
    trainer = Trainer(model, progress=False, out_dir=str(tmp_path))
    return trainer, trainer.save()


def test_a_checkpoint_of_another_configuration_with_the_same_shapes_is_refused(tmp_path):
    from revnet_zero.models import ReversibleBERT
    from revnet_zero.training import Trainer
    _trainer_checkpoint(tmp_path, tiny(rope_theta=10000.0, ffn="swiglu"))
    other = tiny(seed=1, rope_theta=500000.0, ffn="geglu")   # same tensors, other model
    before = {k: v.clone() for k, v in other.state_dict().items()}
    trainer = Trainer(other, progress=False)
    with pytest.raises(ValueError, match=r"another model configuration: ffn: checkpoint 'swiglu', model 'geglu'; "
                                         r"rope_theta: checkpoint 10000.0, model 500000.0"):
        trainer.load(tmp_path / "checkpoints")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing loaded
    with pytest.raises(ValueError, match="ffn"):
        load_checkpoint(tmp_path / "checkpoints", other, allow_config_changes=["rope_theta"])
    trainer.load(tmp_path / "checkpoints", allow_config_changes=["rope_theta", "ffn"])  # deliberate
    assert_same_weights(tiny(rope_theta=10000.0, ffn="swiglu"), other)
    bert = ReversibleBERT(TransformerConfig.preset("tiny", causal=False))  # the GPT's tensors exactly
    with pytest.raises(ValueError, match="model_class: checkpoint ReversibleGPT, model ReversibleBERT; causal"):
        load_checkpoint(tmp_path / "checkpoints", bert)


def test_flipped_bytes_in_the_weights_are_detected(tmp_path):
    path = save_checkpoint(tmp_path, 1, tiny(), {"step": 1})
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside a tensor: the file still parses
    weights.write_bytes(bytes(data))
    read_weights(weights)
    with pytest.raises(ValueError, match=r"checksum mismatch in .*model\.safetensors"):
        load_checkpoint(tmp_path, tiny())


def test_a_trainer_state_of_the_wrong_structure_is_named(tmp_path):
    from revnet_zero.training import Trainer
    model = tiny()
    save_checkpoint(tmp_path / "a", 1, model, {"steps": 1, "weights": {}})
    trainer = Trainer(tiny(seed=2), progress=False)
    with pytest.raises(ValueError, match=r"trainer state lacks \['step', 'optimizer', 'scaler', 'rng', 'data'\]"):
        trainer.load(tmp_path / "a")
    good = Trainer(model, progress=False).state_dict()
    save_checkpoint(tmp_path / "b", 1, model, {**good, "rng": [{"cpu": torch.zeros(10, dtype=torch.uint8),
                                                                 "cuda": []}]})
    with pytest.raises(ValueError, match=r"'rng' must hold.*5056 bytes"):
        trainer.load(tmp_path / "b")
    mine, theirs = trainer.module.state_dict(), model.state_dict()
    assert trainer.step == 0 and not torch.equal(mine["embed.weight"], theirs["embed.weight"])  # nothing loaded


def test_temporaries_of_a_killed_save_are_cleaned_on_the_next_save_or_load(tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    import socket
    host = socket.gethostname()
    pid = int(dead.stdout)  # a process that has exited: its leftovers may go
    path = save_checkpoint(tmp_path, 1, tiny(), {"step": 1})
    leftovers = [path / f".model.safetensors.tmp-{host}-{pid}", tmp_path / f".latest.tmp-{host}-{pid}"]
    live = path / f".trainer.pt.tmp-{host}-{os.getppid()}"  # a running writer's file stays
    elsewhere = path / f".trainer.pt.tmp-another-machine-{pid}"  # so does one written from another host
    for f in [*leftovers, live, elsewhere]:
        f.write_bytes(b"half a file")
    load_checkpoint(tmp_path, tiny())
    assert not any(f.exists() for f in leftovers) and live.exists() and elsewhere.exists()
    (tmp_path / "step-000002").mkdir()
    again = tmp_path / "step-000002" / f".model.safetensors.tmp-{host}-{pid}"
    again.write_bytes(b"half")
    save_checkpoint(tmp_path, 3, tiny(), {"step": 3})
    assert not again.exists()


KILLED_RESAVE = """
import os, sys, torch
from revnet_zero.models import ReversibleGPT, TransformerConfig
from revnet_zero.training import checkpoint as ckpt
root, where = sys.argv[1], sys.argv[2]
torch.manual_seed(1)
model = ReversibleGPT(TransformerConfig.preset("tiny"))
if where == "writing":
    ckpt.save_state = lambda state, path: os._exit(9)        # killed after the new weights are written
else:
    real, calls = os.rename, []
    def rename(a, b):
        calls.append(a)
        if len(calls) == 2:                                   # the old folder set aside, the new one not in
            os._exit(9)
        real(a, b)
    ckpt.os.rename = rename
ckpt.save_checkpoint(root, 2, model, {"step": 2})
"""


@pytest.mark.parametrize("where", ["writing", "swapping"])
def test_a_kill_while_saving_a_step_again_keeps_the_step_already_saved(tmp_path, where):
    """A run resumed from an earlier step writes step-N again; a kill in the middle (while writing, or
    between setting the old folder aside and putting the new one in) must leave the first step-N."""
    import subprocess
    import sys
    save_checkpoint(tmp_path, 2, tiny(), {"step": "first"})
    child = subprocess.run([sys.executable, "-c", KILLED_RESAVE, str(tmp_path), where], capture_output=True,
                           text=True)
    assert child.returncode == 9, child.stderr[-2000:]
    fresh = tiny(seed=5)
    assert load_checkpoint(tmp_path, fresh) == {"step": "first"}
    assert_same_weights(tiny(), fresh)
    assert not list(tmp_path.glob(".step-*")), "the killed save's folders are cleaned on load"


def test_a_field_added_to_the_config_after_the_checkpoint_counts_as_its_default(tmp_path):
    from revnet_zero.training.checkpoint import model_metadata
    model = tiny()
    older = model_metadata(model)   # as a version without the attention fields would have written it
    for key in ("attention", "attention_window", "rf_kernel"):
        older["model_config"].pop(key)
    save_checkpoint(tmp_path, 1, model, {"step": 1}, older)
    load_checkpoint(tmp_path, tiny(seed=1))    # the defaults: the same model
    changed = tiny(seed=1, attention_window=128)   # not the default: refused, and said so
    with pytest.raises(ValueError, match=r"attention_window: checkpoint no value \(default 4096\), model 128"):
        load_checkpoint(tmp_path, changed)
