"""Importing this registers the torch backend's implementations."""

from . import logps  # noqa: F401
