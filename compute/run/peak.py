"""Peak memory of a stage: the process's resident high-water mark (Linux VmHWM, reset through clear_refs) and, on a
GPU, torch's peak allocation. Measured per stage so that --max-memory can be checked against what a stage used.

A stage's own use is its peak less ``start_mib``, the resident set when it began. With glibc's default allocator both
include memory freed earlier and kept by the allocator for reuse (its mmap threshold grows with every large block
freed): several hundred MB on the demo run. ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment makes the resident set
follow the live tensors (every block over 128 kB is mapped and unmapped on its own), at a cost in time: the setting
to measure what a stage needs (BENCHMARKS.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

_started: dict = {}


def _status(field: str) -> float | None:
    """A VmXXX line of /proc/self/status in MiB, None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def reset(device: torch.device) -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size to the current one
    except OSError:
        pass  # not Linux, or not allowed: the peak then covers the run so far
    _started["host_mib"] = _status("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _started["device_mib"] = round(torch.cuda.memory_allocated(device) / (1 << 20), 1)


def read(device: torch.device) -> dict:
    """{"host_mib": peak resident MiB since reset, "start_mib": resident MiB at reset, "device_mib": peak GPU MiB
    allocated by torch and "device_start_mib" (GPU only)}: a stage's own use is the peak less the start."""
    peak = {}
    high = _status("VmHWM")
    if high is not None:
        peak["host_mib"] = high
        if _started.get("host_mib") is not None:
            peak["start_mib"] = _started["host_mib"]
    if device.type == "cuda":
        peak["device_mib"] = round(torch.cuda.max_memory_allocated(device) / (1 << 20), 1)
        peak["device_start_mib"] = _started.get("device_mib", 0.0)
    return peak
