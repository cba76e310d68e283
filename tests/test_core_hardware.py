"""Counting GPUs without torch, as CUDA counts them."""

from __future__ import annotations

import fnmatch
import types

import pytest
from vistune import hardware

#: What /dev holds on a machine with four NVIDIA GPUs.
DEVICE_NODES = ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidia3", "/dev/nvidiactl", "/dev/nvidia-uvm"]


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        (None, 4),
        ("", 0),
        ("-1", 0),
        ("1,3", 2),
        ("0,2,-1,1", 2),  # the CUDA Programming Guide's example: entries after an invalid one are ignored
        ("GPU-8932f937-d72c-4106-c12f-20bd9faed9f6", 1),
        ("0,1,2,3,4,5", 4),
    ],
)
def test_visible_gpu_count_follows_cuda_visible_devices(visible, expected, monkeypatch):
    monkeypatch.setattr(hardware, "glob", types.SimpleNamespace(glob=lambda pattern: fnmatch.filter(DEVICE_NODES, pattern)))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert hardware.visible_gpu_count() == expected
