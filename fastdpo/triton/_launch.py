"""Running a kernel launch on its tensors' device."""

from __future__ import annotations

import contextlib

import torch

from . import _interpreter


def check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not _interpreter.active():
        raise ValueError(f"{name} is a CPU tensor: the triton backend runs on CPU tensors only "
                         "under TRITON_INTERPRET=1")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {t.device}: the triton backend runs on CUDA devices")


def device_of(t: torch.Tensor):
    """The launch guard: Triton launches on the current device and stream, which need not be the
    tensor's (a tensor on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def run(kernel, grid, args, meta, **options) -> None:
    """Launch ``kernel[grid](*args, **meta)`` on the device of its first tensor argument.
    ``enable_fp_fusion`` is pinned on: the kernels are written for FMAs."""
    first = next(a for a in args if isinstance(a, torch.Tensor))
    with device_of(first), _interpreter.quiet():
        kernel[grid](*args, **meta, enable_fp_fusion=True, **options)
