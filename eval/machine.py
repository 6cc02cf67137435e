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
from importlib.metadata import version
from pathlib import Path

import torch


def machine_info(device: torch.device) -> dict[str, str | int]:
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
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda or "unknown"
    return info


def load_average() -> float | None:
    """The 1-minute load average (runnable processes; compare with the core count), where the OS has one."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def describe_machine(info: dict[str, str | int]) -> str:
    """One line for a report, from :func:`machine_info` (plus ``load_before`` / ``load_after``
    1-minute load averages when a measurement recorded them)."""
    parts = [f"CPU {info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads)"]
    if "gpu" in info:
        parts.append(f"GPU {info['gpu']} (CUDA {info['cuda']})")
    parts.append(f"torch {info['torch']}, diffusers {info['diffusers']}, Python {info['python']}")
    if info.get("load_before") is not None:
        parts.append(f"load average {info['load_before']:.2f} at the start, {info['load_after']:.2f} after the timed runs")
    return "; ".join(parts)


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
