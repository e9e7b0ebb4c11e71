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


def test_a_stage_records_where_it_started():
    cpu = torch.device("cpu")
    block = np.ones(128 << 17)  # 128 MiB held before the stage starts
    peak.reset(cpu)
    inner = np.ones(64 << 17)  # the stage's own 64 MiB
    used = peak.read(cpu)
    del inner, block
    assert used["start_mib"] >= 128
    assert 60 <= used["host_mib"] - used["start_mib"] <= 80
