"""Checkpoints: weights in safetensors, the trainer's state beside them, nothing half-written.

Layout of a checkpoint root::

    root/
      latest              # name of the newest complete checkpoint; rewritten last (the commit point)
      step-000100/
        model.safetensors # weights; tied tensors stored once, their aliases in the metadata
        trainer.pt        # optimizer, grad scaler, RNG, data position, step (torch.save; read back
                          # with torch.load(weights_only=True), so loading runs no pickled code)

Every file is written to a temporary name in its own folder, fsynced, then ``os.replace``d: a crash
leaves the previous checkpoint, and ``latest`` pointing to it, intact.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from torch import nn

WEIGHTS, STATE, LATEST = "model.safetensors", "trainer.pt", "latest"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError("checkpoints are written with safetensors: pip install safetensors") from e
    return safetensors


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)``, fsync the result, then rename it onto ``path`` in one step."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers create 0600 files; give the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _dedup(state: dict) -> tuple[dict, dict]:
    """Split a state dict into tensors to write and aliases (tied weights: the same view twice)."""
    tensors, aliases, seen, storages = {}, {}, {}, set()
    for name, t in state.items():
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in seen and t.numel() > 0:
            aliases[name] = seen[view]
            continue
        seen[view] = name
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors that overlap in memory; other views of one storage are copied
        tensors[name] = t.contiguous() if ptr not in storages else t.clone()
        storages.add(ptr)
    return tensors, aliases


def save_weights(model: nn.Module | dict, path, metadata: dict | None = None) -> None:
    """Write ``model.state_dict()`` (or a state dict of plain tensors) to a safetensors file,
    atomically. ``metadata``: JSON-able extras."""
    tensors, aliases = _dedup(model.state_dict() if isinstance(model, nn.Module) else model)
    meta = {"aliases": json.dumps(aliases), **{k: json.dumps(v, default=str) for k, v in (metadata or {}).items()}}
    atomic_write(path, lambda tmp: _safetensors().torch.save_file(tensors, str(tmp), metadata=meta))


def read_weights(path) -> tuple[dict, dict]:
    """(state dict with aliases restored, metadata) of a weights file; ValueError if unreadable."""
    st = _safetensors()
    try:
        with st.safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (st.SafetensorError, OSError) as e:
        raise ValueError(f"cannot read weights {path}: {e} (truncated, or not a safetensors file)") from None
    aliases = json.loads(meta.pop("aliases", "{}"))
    for name, source in aliases.items():
        tensors[name] = tensors[source]
    return tensors, {k: json.loads(v) for k, v in meta.items()}


def load_weights(model: nn.Module, path) -> dict:
    """Load a weights file into ``model``; ValueError naming every tensor that is missing, extra, or of
    another shape. Returns the file's metadata."""
    tensors, meta = read_weights(path)
    check_weights(tensors, model.state_dict(), path)
    model.load_state_dict(tensors)
    return meta


def check_weights(tensors: dict, expected: dict, path) -> None:
    """ValueError naming every tensor of ``tensors`` that is missing from ``expected`` (a model's
    state dict), extra, or of another shape."""
    problems = [f"missing {k} {tuple(expected[k].shape)}" for k in expected if k not in tensors]
    problems += [f"unexpected {k} {tuple(tensors[k].shape)}" for k in tensors if k not in expected]
    problems += [f"{k}: checkpoint has shape {tuple(tensors[k].shape)}, model has {tuple(expected[k].shape)}"
                 for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError(f"checkpoint {path} does not fit this model (another architecture or config?): "
                         + "; ".join(problems[:8]) + more)


def save_state(state: dict, path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot read trainer state {path}: {str(e).splitlines()[0]} (truncated or "
                         "corrupted file?)") from None


def latest_checkpoint(root) -> Path | None:
    """The newest complete checkpoint under ``root``, or None if there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / WEIGHTS).exists() or not (path / STATE).exists():
        raise ValueError(f"{pointer} names {path}, which lacks {WEIGHTS} or {STATE}")
    return path


def save_checkpoint(root, step: int, model: nn.Module | dict, state: dict, metadata: dict | None = None,
                    keep: int = 2) -> Path:
    """Write checkpoint ``root/step-{step}``, make it the latest, then delete all but the ``keep`` newest.
    ``model``: the module, or its full state dict (gathered from a sharded model)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    path = root / f"step-{step:06d}"
    path.mkdir(parents=True, exist_ok=True)
    save_weights(model, path / WEIGHTS, metadata)
    save_state(state, path / STATE)
    atomic_write(root / LATEST, lambda tmp: tmp.write_text(path.name + "\n"))
    # incomplete ones (a crash mid-write) go first, then the oldest
    others = sorted((p for p in root.glob("step-*") if p.is_dir() and p != path),
                    key=lambda p: ((p / WEIGHTS).exists() and (p / STATE).exists(), p.stat().st_mtime_ns))
    for old in others[: max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old)
    return path


def load_checkpoint(path, model: nn.Module) -> dict:
    """Load weights into ``model`` and return the trainer state. ``path``: a checkpoint folder, or a
    root holding a ``latest`` pointer."""
    path = resolve_checkpoint(path)
    load_weights(model, path / WEIGHTS)
    return load_state(path / STATE)


def resolve_checkpoint(path) -> Path:
    """The checkpoint folder ``path`` names: itself, or the latest one when it is a root."""
    path = Path(path)
    if (path / LATEST).exists():
        path = latest_checkpoint(path)
    if not (path / WEIGHTS).exists():
        raise FileNotFoundError(f"no checkpoint at {path}: expected {path / WEIGHTS} or {path / LATEST}")
    return path
