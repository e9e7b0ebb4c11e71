"""Offline compute stage: models, data, the ablation engine and the analyses, written through ``store``."""
