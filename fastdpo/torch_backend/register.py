"""Importing this registers the torch backend's implementations."""

from . import logps  # noqa: F401
from . import linear  # noqa: F401,E402  (torch and native fused-LM-head impls)
