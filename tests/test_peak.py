"""Per-stage peak memory: the resident high-water mark is reset between stages, so each stage's figure is its own."""

from __future__ import annotations

import numpy as np
import torch

from compute.run import peak


def test_peak_rises_with_an_allocation_and_resets_after_it():
    cpu = torch.device("cpu")
    peak.reset(cpu)
    before = peak.read(cpu)["host_mib"]
    block = np.ones(256 << 17)  # 256 MiB of float64, touched
    during = peak.read(cpu)["host_mib"]
    del block
    peak.reset(cpu)
    after = peak.read(cpu)["host_mib"]
    assert during - before >= 250
    assert after < during - 200
