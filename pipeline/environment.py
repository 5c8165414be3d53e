"""What, besides the inputs, decides a run's floating-point results: recorded in every run's summary.

Training is bit-identical when repeated on one machine, but float sums are not associative, so the
kernels chosen at run time change the last bits of every step and, over a few hundred steps, the final
accuracy (README, "Reproducibility"): the CPU kernels ATen dispatches to (``ATEN_CPU_CAPABILITY``:
default, avx2, avx512), the ones oneDNN and MKL pick for convolutions and matrix products
(``ONEDNN_MAX_CPU_ISA``, ``MKL_CBWR``), the number of
intra-op threads that split each reduction (``torch.get_num_threads()``, ``OMP_NUM_THREADS``), and the
library versions.

Beside it, what a run used of the machine: its resident memory now and at its peak (`rss_bytes`,
`peak_rss_bytes`), which every run's summary and `distillery bench` record.
"""

from __future__ import annotations

import os
import platform
import resource
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

_PACKAGES = ("timm", "numpy", "pillow")
_KNOBS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe_environment(device: torch.device) -> dict[str, Any]:
    """The settings a run's numbers depend on beyond its config; the same values reproduce it to the bit."""
    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, **{p: _version(p) for p in _PACKAGES}},  # torch's build too
        "env": {k: os.environ[k] for k in _KNOBS if k in os.environ},
    }


def _status_kib(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith(f"{field}:"))


def rss_bytes() -> int:
    """Resident memory of this process now (VmRSS; off Linux, the peak so far)."""
    now = _status_kib("VmRSS")
    return 1024 * (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if now is None else now)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process or any finished child (DataLoader workers).

    This process's own peak is Linux's VmHWM: ``ru_maxrss`` survives ``execve``, so a process spawned by a
    large parent (a sweep, `distillery bench`) would report the parent's peak instead of its own.
    """
    own = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    return 1024 * max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
