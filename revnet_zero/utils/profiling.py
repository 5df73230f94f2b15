"""A memory timeline and trace of a block of code, on PyTorch's own recorders.

On CUDA: ``torch.cuda.memory._record_memory_history`` (every allocation and free, with time) and
``torch.profiler`` (operators, kernels, memory per operator). On CPU: ``torch.profiler`` with
``profile_memory=True`` (its allocation events make the timeline).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

MiB = 2**20


class DetailedMemoryProfiler:
    """Records memory and operators inside ``with profiler:``.

    Example::

        profiler = DetailedMemoryProfiler()
        with profiler:
            model(input_ids).loss.backward()
        report = profiler.generate_report()
        print(report.summary())
        report.plot_memory_timeline('memory_timeline.png')
        report.export_chrome_trace('trace.json')
    """

    def __init__(self, max_entries: int = 200_000, record_shapes: bool = True):
        self.max_entries, self.record_shapes = max_entries, record_shapes
        self.cuda = torch.cuda.is_available()
        self._prof = None
        self._snapshot = None
        self._peak = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.memory._record_memory_history(max_entries=self.max_entries)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._prof = profile(activities=activities, profile_memory=True, record_shapes=self.record_shapes)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        if self.cuda:
            torch.cuda.synchronize()
            self._snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            self._peak = torch.cuda.max_memory_allocated()
        return False

    def generate_report(self) -> MemoryReport:
        if self._prof is None:
            raise ValueError("nothing recorded: use the profiler as `with profiler:` first")
        return MemoryReport(self._prof, _timeline(self._prof, self._snapshot), self._peak, self.cuda)


def _timeline(prof, snapshot) -> list[tuple[float, int]]:
    """(microseconds from start, bytes allocated) after every allocation and free."""
    events = []
    if snapshot is not None:
        for trace in snapshot.get("device_traces", []):
            for e in trace:
                if e["action"] == "alloc":
                    events.append((e["time_us"], e["size"]))
                elif e["action"] == "free_completed":
                    events.append((e["time_us"], -e["size"]))
    else:
        for e in prof.events():  # an operator's own allocations and frees, and frees outside any operator
            if e.self_cpu_memory_usage:
                events.append((e.time_range.start, e.self_cpu_memory_usage))
    events.sort()
    t0 = events[0][0] if events else 0
    total, out = 0, []
    for t, delta in events:
        total += delta
        out.append((t - t0, total))
    return out


@dataclass
class MemoryReport:
    prof: object
    timeline: list[tuple[float, int]]   # (us, bytes allocated since recording began, relative)
    peak_bytes: int | None              # torch.cuda.max_memory_allocated (absolute), CUDA only
    cuda: bool

    def summary(self, rows: int = 10) -> str:
        rel_peak = max((b for _, b in self.timeline), default=0)
        sort = "self_cuda_memory_usage" if self.cuda else "self_cpu_memory_usage"
        head = [f"device: {'cuda ' + torch.cuda.get_device_name() if self.cuda else 'cpu'}"]
        if self.peak_bytes is not None:
            head.append(f"peak allocated (torch.cuda.max_memory_allocated): {self.peak_bytes / MiB:.1f} MiB")
        head.append(f"peak growth while recording: {rel_peak / MiB:.1f} MiB over {len(self.timeline)} "
                    "allocation events")
        table = self.prof.key_averages().table(sort_by=sort, row_limit=rows)
        return "\n".join(head) + "\n" + table

    def plot_memory_timeline(self, path: str) -> None:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("plotting needs matplotlib: pip install 'revnet-zero[cli]'") from e
        fig, ax = plt.subplots(figsize=(8, 3.5))
        xs = [t / 1e3 for t, _ in self.timeline]
        ax.step(xs, [b / MiB for _, b in self.timeline], where="post")
        ax.set_xlabel("time (ms)")
        ax.set_ylabel("allocated since start (MiB)")
        ax.set_title("memory timeline")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def export_chrome_trace(self, path: str) -> None:
        self.prof.export_chrome_trace(path)
