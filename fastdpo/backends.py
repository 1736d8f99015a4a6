"""Which backend runs an op: availability (with the reason when not), and the ``auto`` choice.

Backends register their implementations of the :mod:`fastdpo.ops` schemas when loaded. Loading is
lazy (Triton and the C++ extension cost seconds to import or build) and cached per process.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

from . import ops

CHOICES = ("auto",) + ops.BACKENDS
# Module whose import registers a backend's implementations (and raises if it cannot).
_MODULES = {
    "torch": "fastdpo.torch_backend.register",
    "triton": "fastdpo.triton.register",
    "native": "fastdpo.native.register",
}
@dataclass(frozen=True)
class Status:
    name: str
    loaded: bool
    reason: str  # why not, when not loaded


_status: dict[str, Status] = {}


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def status(name: str) -> Status:
    """Load ``name`` once and report whether it works in this process."""
    if name not in _status:
        try:
            importlib.import_module(_MODULES[name])
            _status[name] = Status(name, True, "")
        except Exception as exc:  # noqa: BLE001 - the reason is reported to the user
            _status[name] = Status(name, False, f"{type(exc).__name__}: {exc}")
    return _status[name]


def device_reason(name: str, device: torch.device) -> str:
    """Why ``name`` cannot run on ``device`` (empty when it can)."""
    st = status(name)
    if not st.loaded:
        return st.reason
    if name == "triton" and device.type == "cpu" and not triton_interpreted():
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if name == "native" and device.type == "cuda":
        from .native import register

        if not register.HAS_CUDA:
            return "the native extension was built without CUDA"
    if device.type not in ("cpu", "cuda"):
        return f"device type {device.type!r} is not supported"
    return ""


@torch.compiler.assume_constant_result  # depends only on the process; traced graphs need no import
def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for ``backend`` (maybe ``"auto"``) on ``device`` for ``dtype``."""
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    if backend != "auto":
        why = device_reason(backend, device)
        if why:
            raise RuntimeError(f"backend {backend!r} is not available on {device}: {why}")
        if dtype not in ops.DTYPES[backend]:
            raise TypeError(f"backend {backend!r} does not take logits of dtype {dtype}")
        return backend
    order = ("triton", "native", "torch") if device.type == "cuda" else ("native", "torch")
    for name in order:
        if dtype in ops.DTYPES[name] and not device_reason(name, device):
            return name
    return "torch"
