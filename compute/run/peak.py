"""Peak memory of a stage: the process's resident high-water mark (Linux VmHWM, reset through clear_refs) and, on a
GPU, torch's peak allocation. Measured per stage so that --max-memory can be checked against what a stage used."""

from __future__ import annotations

from pathlib import Path

import torch


def reset(device: torch.device) -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size to the current one
    except OSError:
        pass  # not Linux, or not allowed: the peak then covers the run so far
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def read(device: torch.device) -> dict:
    """{"host_mib": peak resident MiB since reset, "device_mib": peak GPU MiB allocated by torch (GPU only)}."""
    peak = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak["host_mib"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    if device.type == "cuda":
        peak["device_mib"] = round(torch.cuda.max_memory_allocated(device) / (1 << 20), 1)
    return peak
