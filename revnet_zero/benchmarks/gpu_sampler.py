"""Peak GPU memory of the whole device, sampled from NVML in a thread (for runs in another process)."""
from __future__ import annotations

import threading


class PeakSampler:
    """``with PeakSampler() as s: ...`` then ``s.peak_gib``: the largest NVML 'used' memory of GPU ``index``
    seen every ``interval`` seconds (None where NVML is missing: no GPU, or nvidia-ml-py not installed)."""

    def __init__(self, index: int = 0, interval: float = 0.05):
        self.index, self.interval, self.peak_gib = index, interval, None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakSampler:
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception:  # noqa: BLE001 - no NVML here: the peak stays None, said so in the row
            return self
        self._thread = threading.Thread(target=self._sample, args=(pynvml, handle), daemon=True)
        self._thread.start()
        return self

    def _sample(self, pynvml, handle) -> None:
        while not self._stop.is_set():
            used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2 ** 30
            self.peak_gib = used if self.peak_gib is None else max(self.peak_gib, used)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
