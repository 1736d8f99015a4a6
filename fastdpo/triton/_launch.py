"""Running a kernel launch on its tensors' device, or specialising it for ahead-of-time
compilation exactly as the JIT would."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

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


class Spec(NamedTuple):
    """What :func:`triton.compile` needs to build one kernel variant ahead of time."""

    name: str
    kernel: object  # the triton JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


def meta_tensor(shape, dtype, aligned: bool = True) -> torch.Tensor:
    """A storage-less stand-in for a launch argument; ``aligned=False`` starts it one element
    into its storage (a row start that is not 16-byte aligned)."""
    if aligned:
        return torch.empty(shape, dtype=dtype, device="meta")
    n = 1
    for d in shape:
        n *= d
    return torch.empty(n + 1, dtype=dtype, device="meta")[1:].view(shape)


def specialize(name, kernel, args, meta) -> Spec:
    """The spec of ``kernel[grid](*args, **meta)`` as the JIT would compile it: each argument's
    type, 16-divisibility and the integers equal to 1 that become constants."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    if type(kernel).__name__ == "InterpretedFunction" or not hasattr(kernel, "arg_names"):
        raise RuntimeError("ahead-of-time compilation needs a process without TRITON_INTERPRET=1 "
                           "(the kernels were built for the interpreter)")
    meta = dict(meta)
    options = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
    options["enable_fp_fusion"] = True
    names = list(kernel.arg_names)
    missing = [n for n in names[len(args):] if n not in meta]
    if missing or len(args) > len(names):
        raise ValueError(f"{name}: arguments do not match {names} (missing {missing})")
    values = dict(zip(names, args))
    sig, const, attrs = {}, {}, {}
    for i, arg in enumerate(names):
        if arg in meta:
            sig[arg], const[arg] = "constexpr", meta[arg]
            continue
        ty, spec = native_specialize_impl(BaseBackend, values[arg], False, True, True)
        if ty == "constexpr":
            sig[arg], const[arg] = "constexpr", spec
        else:
            sig[arg] = ty
            parsed = BaseBackend.parse_attr(spec) if isinstance(spec, str) else []
            if parsed:
                attrs[(i,)] = parsed
    return Spec(name, kernel, sig, const, attrs, options)
