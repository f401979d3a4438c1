"""Adaptation strategies, adapter files, the training engine, the CLI and the server."""

__version__ = "0.1.0"
