"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:  # noqa: ANN001 - any callable
    """Seconds `fn()` takes, its device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def machine(device: torch.device | None = None) -> str:
    """CPU model, torch threads, the GPU (or "no GPU") and the torch version, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    on_gpu = device is not None and device.type == "cuda"
    gpu = f", {torch.cuda.get_device_name(device)}" if on_gpu else ", no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads{gpu}, torch {torch.__version__}"
