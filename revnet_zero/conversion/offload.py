"""Host offload for BDIA (``convert_to_reversible(..., offload=True)``): the grid tensors and the kept bits
wait in pinned host memory between their uses.

Each converted model owns one ``HostQueue``; its layers park tensors through it, so the wait that keeps
the host at most one copy ahead of the GPU is per model, not per process.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.kept_attention import _side_stream

PIN_CHUNK_MIN = 64 * 2 ** 20   # bytes: host copies are pinned in power-of-two chunks down to this size


def host_chunk_sizes(numel: int, element_size: int) -> list[int]:
    """Element counts of the pinned chunks a host copy of ``numel`` elements is split into.

    PyTorch's pinned-memory allocator rounds every block up to a power of two bytes (it indexes its
    free lists by that), so one 20 GiB grid tensor (655,360 tokens of a d=4096 model) would pin 32 GiB.
    Split into the binary digits of its size down to ``PIN_CHUNK_MIN`` bytes, plus one remainder
    smaller than that, a copy pins at most its own size plus ``PIN_CHUNK_MIN``; copies of equal size
    split alike, so the allocator reuses their blocks from step to step."""
    unit = max(1, PIN_CHUNK_MIN // element_size)   # a power of two: element sizes are 1, 2, 4 or 8
    whole, rest = numel - numel % unit, numel % unit
    sizes = [1 << bit for bit in reversed(range(whole.bit_length())) if whole >> bit & 1]
    return sizes + ([rest] if rest else [])


def to_host(src: Tensor, pin: bool) -> list[Tensor]:
    """``src`` (any shape) copied into host chunks (``host_chunk_sizes``), non-blocking from CUDA."""
    flat, chunks, at = src.reshape(-1), [], 0
    for n in host_chunk_sizes(flat.numel(), flat.element_size()):
        chunks.append(torch.empty(n, dtype=src.dtype, pin_memory=pin).copy_(flat[at:at + n], non_blocking=True))
        at += n
    return chunks


def from_host(chunks: list[Tensor], shape: torch.Size, device: torch.device) -> Tensor:
    """A fresh ``device`` tensor of ``shape`` from the chunks of ``to_host`` (non-blocking copies)."""
    out = torch.empty(shape, dtype=chunks[0].dtype, device=device)
    flat, at = out.view(-1), 0
    for c in chunks:
        flat[at:at + c.numel()].copy_(c, non_blocking=True)
        at += c.numel()
    return out


class HostQueue:
    """The copies to host memory of one converted model: ``in_flight`` is the ready event of the last
    one, which the next copy waits for (see ``Parked``)."""

    def __init__(self):
        self.in_flight: torch.cuda.Event | None = None

    def __deepcopy__(self, memo) -> HostQueue:
        return HostQueue()   # a copied model has no copy in flight (and a CUDA event does not copy)

    def wait(self) -> None:
        if self.in_flight is not None:
            self.in_flight.synchronize()
            self.in_flight = None


class Parked:
    """A grid tensor kept in pinned host memory between its uses.

    The device-to-host copy runs on a side stream, overlapping the layer's own kernels; the device
    memory is released once that copy is done (``keep=False``) or held for one ``take`` (``keep=True``:
    the next layer needs it at once). ``take`` returns a device tensor the caller may overwrite: the
    held one, or a fresh host-to-device copy. The host copy is pinned in chunks (``host_chunk_sizes``).
    On the CPU the tensor is kept as is and ``take`` clones it, so the bookkeeping is the same (and
    testable) without a GPU.

    A new copy first waits (on the host) for the model's previous one (``queue``) to finish. Without
    that the host runs ahead of the GPU by as many layers as it can queue, and every layer it is ahead
    holds a pinned block (reused only once the copies using it are done), so the pinned peak grows
    with depth. The host stays at most one copy ahead, which at the lengths offload is for (a layer
    takes seconds) costs the GPU nothing."""

    def __init__(self, t: Tensor, queue: HostQueue, keep: bool = False):
        self.dev, self.device, self.ready, self.shape = (t if keep else None), t.device, None, t.shape
        if not t.is_cuda:
            self.host = t
            return
        queue.wait()
        side = _side_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.host = to_host(t, pin=True)
            self.ready = torch.cuda.Event()
            self.ready.record(side)
        queue.in_flight = self.ready
        t.record_stream(side)  # t's memory is not reused before the copy has read it

    def take(self) -> Tensor:
        if self.dev is not None:
            t, self.dev = self.dev, None
            return t
        if self.ready is None:
            return self.host.clone()
        torch.cuda.current_stream().wait_event(self.ready)
        return from_host(self.host, self.shape, self.device)


def park(t: Tensor, queue: HostQueue | None, keep: bool = False):
    """``t`` parked in host memory through ``queue``, or ``t`` itself without one (no offload)."""
    return Parked(t, queue, keep) if queue is not None else t


def take(t):
    """The device tensor of a ``park`` result."""
    return t.take() if isinstance(t, Parked) else t
