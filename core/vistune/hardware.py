"""What accelerators this machine has, found without importing torch (for --dry-run)."""

from __future__ import annotations

import glob
import itertools
import os


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (what a scheduler or ``taskset`` allows), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def visible_gpu_count() -> int:
    """NVIDIA GPUs visible to this process (device nodes, narrowed by CUDA_VISIBLE_DEVICES)."""
    devices = [d for d in glob.glob("/dev/nvidia[0-9]*") if d[len("/dev/nvidia") :].isdigit()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        # CUDA stops at the first invalid entry: "0,2,-1,1" makes devices 0 and 2 visible
        wanted = list(itertools.takewhile(lambda v: v.strip() and not v.strip().startswith("-"), visible.split(",")))
        return min(len(wanted), len(devices))
    return len(devices)
