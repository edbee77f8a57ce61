"""How busy the machine was while a benchmark block ran (shared by the scripts in this folder)."""
from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["LoadMeter"]


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have used (Linux ``/proc/stat``), or None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def _loadavg():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


class LoadMeter:
    """Context manager: ``cores`` kept busy by *other* processes while the block ran (a quiet machine reads ~0),
    and the load averages at the start and the end (``loadavg_start``, ``loadavg``). Timings are only comparable
    run to run on a quiet machine; ratios of interleaved runs suffer less."""

    def __enter__(self) -> "LoadMeter":
        self.wall, self.busy, self.own = time.perf_counter(), _busy_cpu_seconds(), time.process_time()
        self.loadavg_start = _loadavg()
        return self

    def __exit__(self, *exc) -> bool:
        busy, wall, own = _busy_cpu_seconds(), time.perf_counter() - self.wall, time.process_time() - self.own
        self.cores = None if busy is None or self.busy is None else max(0.0, (busy - self.busy - own) / wall)
        self.loadavg = _loadavg()
        return False
