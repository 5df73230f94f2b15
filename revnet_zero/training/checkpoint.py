"""Checkpoints: weights in safetensors, the trainer's state beside them, nothing half-written.

Layout of a checkpoint root::

    root/
      latest              # name of the newest complete checkpoint; rewritten last (the commit point)
      step-000100/
        model.safetensors # weights; tied tensors stored once, their aliases in the metadata
        trainer.pt        # optimizer, grad scaler, RNG, data position, step (torch.save; read back
                          # with torch.load(weights_only=True), so loading runs no pickled code)
        checksums.json    # sha256 of the two files above, checked on every load

Every file is written to a temporary name in its own folder, fsynced, then ``os.replace``d: a crash
leaves the previous checkpoint, and ``latest`` pointing to it, intact; the temporary files of a
killed writer are removed by the next save or load. Only finite weights are written, so every
checkpoint that verifies is one training can go on from. A load refuses a checkpoint whose files do
not match their checksums, whose tensors do not fit the model, or whose recorded model class or
configuration differs from the model's (``allow_config_changes`` names deliberate changes).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import shutil
import socket
import warnings
from collections.abc import Iterable
from dataclasses import MISSING, asdict, fields, is_dataclass
from pathlib import Path

import torch
from torch import nn

WEIGHTS, STATE, LATEST, CHECKSUMS = "model.safetensors", "trainer.pt", "latest", "checksums.json"
TMP_MARK = ".tmp-"   # temporary files are named .{name}.tmp-{host}-{pid} beside their target
OLD_MARK = ".old-"   # a checkpoint folder set aside while its re-save is swapped in


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
    tmp = path.with_name(f".{path.name}{TMP_MARK}{_writer_id()}")
    try:
        try:
            write(tmp)
        except OSError as e:  # say which file could not be written (a full disk names none)
            why = f"cannot write {path}: {e.strerror or e}"
            raise (OSError(e.errno, why) if e.errno is not None else OSError(why)) from e
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
    def write(tmp):
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) as RuntimeError
            if "PytorchStreamWriter" not in str(e) and "write failed" not in str(e):
                raise
            free = shutil.disk_usage(Path(tmp).parent).free
            raise OSError(errno.EIO, f"{str(e).strip().splitlines()[-1]} ({free / 2**20:.0f} MiB free "
                                     "on that disk)") from e
    atomic_write(path, write)


def load_state(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot read trainer state {path}: {str(e).splitlines()[0]} (truncated or "
                         "corrupted file?)") from None


def model_metadata(model: nn.Module) -> dict:
    """What a checkpoint records of the model it was written from: its class and, when the model has
    a dataclass ``config``, that config as JSON values (as it reads back from the file)."""
    meta = {"model_class": _user_class(model).__name__}
    config = getattr(model, "config", None)
    if is_dataclass(config):
        meta["model_config"] = json.loads(json.dumps(asdict(config), default=str))
    return meta


def _user_class(model: nn.Module) -> type:
    """The model's class; under FSDP2 the class fully_shard swapped in (FSDPReversibleGPT) is skipped."""
    cls = type(model)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule
        if isinstance(model, FSDPModule):
            cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls


def check_config(meta: dict, model: nn.Module, path, allow_config_changes: Iterable[str] | bool = ()) -> None:
    """ValueError naming every recorded model field (and the class) that differs from ``model``'s,
    except those in ``allow_config_changes`` (True: allow any). Shapes alone do not tell a GPT from a
    BERT, nor one rope_theta from another. A field the checkpoint does not record (added to the config
    class after it was written) counts as its default value."""
    if allow_config_changes is True:
        return
    allowed = set(allow_config_changes or ())
    now = model_metadata(model)
    diffs = []
    if "model_class" in meta and meta["model_class"] != now["model_class"] and "model_class" not in allowed:
        diffs.append(f"model_class: checkpoint {meta['model_class']}, model {now['model_class']}")
    saved, current = meta.get("model_config"), now.get("model_config")
    if isinstance(saved, dict) and current is not None:
        defaults = _config_defaults(model.config)
        for key in sorted((set(saved) | set(current)) - allowed):
            then = saved[key] if key in saved else defaults.get(key, "<absent>")
            if then != current.get(key, "<absent>"):
                recorded = repr(then) if key in saved else f"no value (default {then!r})"
                diffs.append(f"{key}: checkpoint {recorded}, model {current.get(key, '<absent>')!r}")
    if diffs:
        raise ValueError(f"checkpoint {path} was written from another model configuration: " + "; ".join(diffs)
                         + ". If the change is deliberate, pass allow_config_changes=[names of those fields]")


def _config_defaults(config) -> dict:
    """The declared defaults of a config dataclass's fields, as JSON values."""
    out = {}
    for f in fields(config):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return json.loads(json.dumps(out, default=str))


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of the floating tensors of ``tensors`` that hold a NaN or an infinity."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _require_finite(tensors: dict, what: str) -> None:
    bad = nonfinite_tensors(tensors)
    if bad:
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        raise FloatingPointError(f"refusing to write {what}: non-finite values in {', '.join(bad[:8])}{more}")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _writer_id() -> str:
    """host-pid: on a shared file system, another machine's pids say nothing about our processes."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _swap_in(stage: Path, path: Path) -> None:
    """Rename the complete folder ``stage`` onto ``path``. An existing ``path`` is first renamed aside
    (``OLD_MARK``); ``clean_temporaries`` puts it back if a kill comes before the new one is in place."""
    old = path.with_name(f".{path.name}{OLD_MARK}{_writer_id()}")
    if path.exists():
        os.rename(path, old)
    os.rename(stage, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def clean_temporaries(folder) -> list[Path]:
    """Delete the temporary files that a writer killed mid-save left in ``folder`` and its step-*
    folders. Only those written from this machine by a process no longer running go: a live writer's
    stay, and so do other machines' (a reader elsewhere on a shared file system cannot tell whether
    their writer still runs). Returns the paths deleted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for old in folder.glob(f".step-*{OLD_MARK}*"):   # a re-saved step-N set aside, the new one not yet in
        target = folder / old.name[1:].split(OLD_MARK)[0]
        if _dead_writer(old.name, OLD_MARK) and not target.exists():
            with contextlib.suppress(OSError):
                os.rename(old, target)
    for tmp in [*folder.glob(f".*{TMP_MARK}*"), *folder.glob(f"step-*/.*{TMP_MARK}*"),
                *folder.glob(f".step-*{OLD_MARK}*")]:
        if not _dead_writer(tmp.name, OLD_MARK if OLD_MARK in tmp.name else TMP_MARK):
            continue
        # a read-only copy of a checkpoint can still be loaded: leaving its leftovers is harmless
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
            removed.append(tmp)
    return removed


def _dead_writer(name: str, mark: str) -> bool:
    """Whether the file or folder ``name`` was left by a process of this machine that no longer runs."""
    writer_host, _, pid = name.rsplit(mark, 1)[1].rpartition("-")
    return (writer_host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid()
            and not _alive(int(pid)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def verify_checkpoint(path, finite: bool = False) -> Path:
    """Check a checkpoint folder's files against its recorded sha256 (and, with ``finite``, that its
    weights are finite); ValueError naming the file that does not match. Returns the folder."""
    path = Path(path)
    sums = path / CHECKSUMS
    if not sums.exists():
        warnings.warn(f"{path} has no {CHECKSUMS} (written before checksums were recorded): its files are "
                      "not verified", stacklevel=3)
    else:
        recorded = json.loads(sums.read_text())
        for name in (WEIGHTS, STATE):
            if name not in recorded or not (path / name).exists():
                raise ValueError(f"checkpoint {path} is incomplete: {name} missing from the folder or {CHECKSUMS}")
            actual = sha256_file(path / name)
            if actual != recorded[name]:
                raise ValueError(f"checksum mismatch in {path / name}: sha256 {actual}, recorded "
                                 f"{recorded[name]} (the file was changed or damaged after it was written)")
    if finite:
        bad = nonfinite_tensors(read_weights(path / WEIGHTS)[0])
        if bad:
            raise ValueError(f"checkpoint {path} holds non-finite weights: {', '.join(bad[:8])}")
    return path


def last_good_checkpoint(root) -> Path | None:
    """The newest checkpoint under ``root`` whose files match their checksums and whose weights are
    finite, or None."""
    root = Path(root)
    for path in sorted((p for p in root.glob("step-*") if p.is_dir()), key=_step_number, reverse=True):
        if not (path / CHECKSUMS).exists():
            continue
        try:
            verify_checkpoint(path, finite=True)
        except ValueError:  # damaged: the next older one may be good
            continue
        return path
    return None


def _step_number(path: Path) -> int:
    """The step of a ``step-N`` folder: names sort as text, and "step-1000000" < "step-999999"."""
    digits = path.name.removeprefix("step-")
    return int(digits) if digits.isdigit() else -1


def latest_checkpoint(root) -> Path | None:
    """The newest complete checkpoint under ``root``, or None if there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / WEIGHTS).exists() or not (path / STATE).exists():
        raise ValueError(f"{pointer} names {path}, which lacks {WEIGHTS} or {STATE}")
    return path


def _complete(path: Path) -> bool:
    return all((path / name).exists() for name in (WEIGHTS, STATE, CHECKSUMS))


def save_checkpoint(root, step: int, model: nn.Module | dict, state: dict, metadata: dict | None = None,
                    keep: int = 2) -> Path:
    """Write checkpoint ``root/step-{step}``, make it the latest, then delete all but the ``keep`` newest.
    ``model``: the module, or its full state dict (gathered from a sharded model). FloatingPointError,
    before anything is written, if a weight is NaN or infinite."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    weights = model.state_dict() if isinstance(model, nn.Module) else model
    _require_finite(weights, f"checkpoint step {step}")
    root = Path(root)
    clean_temporaries(root)
    path = root / f"step-{step:06d}"
    # written whole into a staging folder, then swapped in: a kill at any point leaves either the old
    # step-N (a re-save, e.g. after resuming from an earlier step) or the new one, never a mix
    stage = root / f".{path.name}{TMP_MARK}{_writer_id()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        save_weights(weights, stage / WEIGHTS, metadata)
        save_state(state, stage / STATE)
        sums = {name: sha256_file(stage / name) for name in (WEIGHTS, STATE)}
        atomic_write(stage / CHECKSUMS, lambda tmp: tmp.write_text(json.dumps(sums, indent=1) + "\n"))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _swap_in(stage, path)
    atomic_write(root / LATEST, lambda tmp: tmp.write_text(path.name + "\n"))
    # incomplete ones (a crash mid-write) go first, then the oldest; the new one is never a candidate
    others = sorted((p for p in root.glob("step-*") if p.is_dir() and p != path),
                    key=lambda p: (_complete(p), p.stat().st_mtime_ns))
    for old in others[: max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old)
    return path


def read_checkpoint(path, model: nn.Module, allow_config_changes: Iterable[str] | bool = ()) -> tuple[dict, dict]:
    """(weights, trainer state) of a checkpoint, every check done and ``model`` left untouched:
    checksums, tensor names and shapes, model class and config. ``path``: a checkpoint folder, or a
    root holding a ``latest`` pointer."""
    clean_temporaries(path)
    path = resolve_checkpoint(path)
    clean_temporaries(path)
    verify_checkpoint(path)
    tensors, meta = read_weights(path / WEIGHTS)
    check_weights(tensors, model.state_dict(), path / WEIGHTS)
    check_config(meta, model, path, allow_config_changes)
    return tensors, load_state(path / STATE)


def load_checkpoint(path, model: nn.Module, allow_config_changes: Iterable[str] | bool = ()) -> dict:
    """Load weights into ``model`` and return the trainer state (see ``read_checkpoint``)."""
    tensors, state = read_checkpoint(path, model, allow_config_changes)
    model.load_state_dict(tensors)
    return state


def resolve_checkpoint(path) -> Path:
    """The checkpoint folder ``path`` names: itself, or the latest one when it is a root."""
    path = Path(path)
    if (path / LATEST).exists():
        path = latest_checkpoint(path)
    if not (path / WEIGHTS).exists():
        raise FileNotFoundError(f"no checkpoint at {path}: expected {path / WEIGHTS} or {path / LATEST}")
    return path
