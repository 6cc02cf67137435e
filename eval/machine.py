"""The machine a measurement ran on: processor names, threads and library versions, for reports.

Example::

    >>> info = machine_info(torch.device("cpu"))
    >>> sorted(info)[:3]
    ['cpu', 'cpu_count', 'diffusers']
    >>> describe_machine(info).startswith("CPU ")
    True
"""

from __future__ import annotations

import os
import platform
import time
from importlib.metadata import version
from pathlib import Path

import torch


def machine_info(device: torch.device | None = None) -> dict[str, str | int]:
    """CPU name and core count, torch's thread count, the GPU (when ``device`` is CUDA) and the
    versions of Python, torch and diffusers."""
    info: dict[str, str | int] = {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda or "unknown"
    return info


class OtherCpuUse:
    """How much CPU other processes used while a block ran (``with``), from the system-wide and
    this process's CPU times: ``cores`` is their average number of busy cores.

    Example::

        >>> with OtherCpuUse() as other:
        ...     sum(range(10**6))
        499999500000
        >>> other.cores >= 0.0
        True
    """

    def __enter__(self) -> OtherCpuUse:
        self._start = _cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, own = (end - start for start, end in zip(self._start, _cpu_seconds()))
        self.cores = max(0.0, busy - own) / wall if wall > 0 else 0.0


def _cpu_seconds() -> tuple[float, float, float]:
    """(wall clock, CPU seconds all processes have used, CPU seconds this process has used)."""
    import psutil

    times = psutil.cpu_times()
    busy = sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))
    own = psutil.Process().cpu_times()
    return time.perf_counter(), busy, own.user + own.system


def describe_machine(info: dict[str, str | int]) -> str:
    """One line for a report, from :func:`machine_info` (plus ``other_cores``, the CPU other
    processes used during the timed runs, when a measurement recorded it)."""
    parts = [f"CPU {info['cpu']} ({info['cpu_count']} cores, torch threads: {info['torch_threads']})"]
    if "gpu" in info:
        parts.append(f"GPU {info['gpu']} (CUDA {info['cuda']})")
    parts.append(f"torch {info['torch']}, diffusers {info['diffusers']}, Python {info['python']}")
    if "other_cores" in info:
        parts.append(f"other processes used {info['other_cores']:.2f} cores on average during the timed runs")
    return "; ".join(parts)


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
