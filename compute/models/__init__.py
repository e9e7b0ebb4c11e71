"""Model registry and architectures. ``get_spec(name)`` is the one entry point."""

from compute.models.registry import ModelSpec, Preprocess, get_spec, model_names, register  # noqa: F401
