"""Measuring one training step: time, peak memory, energy, and the facts every figure carries."""
from __future__ import annotations

import datetime
import gc
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

GIB = 2 ** 30


# ---------------------------------------------------------------- environment

def git_commit(repo_dir: str | None = None) -> str:
    """``git rev-parse --short HEAD`` (with ``-dirty`` if the tree has changes), or ``REVNET_COMMIT``,
    or ``'unknown'`` where neither exists (the GPU machine gets a copy of the tree without ``.git``)."""
    if os.environ.get("REVNET_COMMIT"):
        return os.environ["REVNET_COMMIT"]
    cwd = repo_dir or os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (for file names)."""
    s = re.sub(r"^nvidia\s+", "", name.strip().lower())
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "unknown"


_MEMORY_CAP: dict[str, float] = {}


def cap_memory(device: torch.device, gib: float | None) -> None:
    """Let PyTorch's allocator use at most ``gib`` GiB of ``device`` (``set_per_process_memory_fraction``),
    so a larger card stands in for a smaller one: an allocation past the cap fails with the usual
    out-of-memory error. Rows record the cap (``memory_cap_gib``). For an 80 GB H100 use 78.4: its
    79.18 GiB total less the ~0.75 GiB its CUDA context and libraries held outside the allocator
    (read off an out-of-memory message on that card)."""
    if gib is None:
        return
    if device.type != "cuda":
        raise ValueError(f"a memory cap needs a CUDA device, got {device}")
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    if not 0 < gib <= total:
        raise ValueError(f"memory cap must be in (0, {total:.2f}] GiB (this card's total), got {gib}")
    index = device.index if device.index is not None else torch.cuda.current_device()  # it refuses a bare "cuda"
    torch.cuda.set_per_process_memory_fraction(gib / total, index)
    _MEMORY_CAP[str(device)] = gib


def environment(device: torch.device, commit: str | None = None) -> dict:
    """Facts that go with every row."""
    return {
        "memory_cap_gib": _MEMORY_CAP.get(str(device)),
        "gpu": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "commit": commit or git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
    }


# ---------------------------------------------------------------- energy

class EnergyMeter:
    """GPU energy from NVML's total-energy counter (millijoules since the driver loaded).

    ``reason`` says why it is unavailable (no CUDA, no pynvml, counter not supported); then
    ``read()`` returns None. The counter updates every few tens of milliseconds: trust it over
    windows of a second or more.
    """

    def __init__(self, device: torch.device):
        self.handle, self.reason, self._nvml = None, None, None
        if device.type != "cuda":
            self.reason = "no CUDA device"
            return
        try:
            import pynvml
        except ImportError:
            self.reason = "pynvml not importable (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            self.handle = _nvml_handle(pynvml, device)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except pynvml.NVMLError as e:
            self.handle, self.reason = None, f"NVML total-energy counter unavailable: {e}"
            return
        self._nvml = pynvml

    def read(self) -> float | None:
        """Joules since the driver loaded, or None."""
        if self.handle is None:
            return None
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0


def _nvml_handle(pynvml, device: torch.device):
    """The NVML device behind a torch CUDA device: matched by UUID, else by index."""
    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            nv = pynvml.nvmlDeviceGetUUID(h)
            nv = nv.decode() if isinstance(nv, bytes) else nv
            if nv.removeprefix("GPU-") == uuid.removeprefix("GPU-"):
                return h
    return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)


# ---------------------------------------------------------------- one step

def model_loss(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(ids)
    loss = getattr(out, "loss", out)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise TypeError(f"benchmarked models must return a scalar loss or an object with .loss; "
                        f"{type(model).__name__} returned {type(out).__name__}")
    return loss


def train_step(model: nn.Module, ids: Tensor, amp_dtype: torch.dtype | None,
               optimizer: torch.optim.Optimizer | None = None) -> float:
    """Forward, loss, backward (and an optimizer step if given); gradients freed after. Returns the loss."""
    with torch.autocast(ids.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = model_loss(model, ids)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return loss.item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def random_ids(vocab_size: int, batch: int, seq_len: int, device: torch.device, seed: int = 0) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(vocab_size, (batch, seq_len), generator=gen).to(device)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


@dataclass
class StepResult:
    status: str                     # 'ok' | 'oom' | 'error'
    step_s: float | None = None     # median of the timed steps
    times: list | None = None
    peak_gib: float | None = None   # max_memory_allocated over the timed steps
    static_gib: float | None = None  # allocated before the timed steps: weights (+ optimizer state)
    energy_j: float | None = None   # over the timed steps
    loss: float | None = None
    error: str | None = None


def measure_step(model: nn.Module, ids: Tensor, amp_dtype: torch.dtype | None, repeats: int,
                 warmup_ids: Tensor | None, optimizer=None, meter: EnergyMeter | None = None) -> StepResult:
    """Warm up on ``warmup_ids`` (None: none), then time ``repeats`` synchronised steps on ``ids``.

    Out-of-memory and other errors are caught and returned as ``status``; the caller frees memory.
    """
    device = ids.device
    try:
        if warmup_ids is not None:
            train_step(model, warmup_ids, amp_dtype, optimizer)
        return _timed(model, ids, amp_dtype, repeats, optimizer, meter)
    except Exception as e:  # noqa: BLE001 - recorded in the row, never swallowed silently
        model.zero_grad(set_to_none=True)
        text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
        return StepResult(status="oom" if is_oom(e) else "error", error=text)
    finally:
        free_memory(device)


def _timed(model, ids, amp_dtype, repeats, optimizer, meter) -> StepResult:
    device = ids.device
    sync(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    static = torch.cuda.memory_allocated(device) / GIB if cuda else None
    e0 = meter.read() if meter is not None else None
    times, loss = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = train_step(model, ids, amp_dtype, optimizer)  # .item() synchronises
        sync(device)
        times.append(time.perf_counter() - t0)
    e1 = meter.read() if meter is not None else None
    peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else None
    energy = (e1 - e0) if e0 is not None and e1 is not None else None
    return StepResult("ok", statistics.median(times), times, peak, static, energy, loss)
