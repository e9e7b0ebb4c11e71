"""Torch-free analysis the app and the report import: significance tests, attribute-drop relations."""
