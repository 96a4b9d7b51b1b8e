"""Peak resident memory of this process over a block of code, sampled by a background thread."""

from __future__ import annotations

import threading
import time

import psutil


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.above_start_gb`` (peak − RSS at entry)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.process = psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def above_start_gb(self) -> float:
        return (self.peak - self.start) / 1e9

    @property
    def start_gb(self) -> float:
        return self.start / 1e9

    @property
    def peak_gb(self) -> float:
        """The process's peak RSS over the block (not relative to the start)."""
        return self.peak / 1e9
