"""Offline compute stage: models, data, the ablation engine and the analyses, written through ``store``."""

import os

# OpenMP threads that spin while waiting made small torch calls 5-10x slower on shared 2-core machines (measured on
# the greedy stage: 389 s -> 50 s). Must be set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
