"""Argument checks shared by the public functions and the losses. Messages name the argument.

Scalar arguments are checked strictly before any dispatch, the same for every backend: a flag
must be a ``bool`` (``shift=2`` is not a shift by two), a number a real number (``True`` is not a
temperature), and so on.

Checks that need the values of a tensor (label range, ``cu_seqlens`` order) read device memory,
so they run only in checked mode: on by default for CPU tensors, off for CUDA tensors, where
they would synchronise the host. ``FASTDPO_CHECK=1`` or ``validate=True`` turns them on
everywhere, also inside ``torch.compile`` (where the default is off): there :func:`require`
puts an assertion into the graph instead of reading the value while tracing.
"""

from __future__ import annotations

import math
import os
from numbers import Integral, Real

import torch

from .ops import BACKENDS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
BACKEND_CHOICES = ("auto",) + BACKENDS
_FP32_MAX = torch.finfo(torch.float32).max
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


# ------------------------------------------------------------------------- value checks


def checked_mode(validate: bool | None, device: torch.device) -> bool:
    """Whether value checks run: ``validate`` when given, else ``FASTDPO_CHECK``, else CPU only
    (and never by default while torch.compile traces)."""
    if validate is not None:
        return bool(validate)
    if os.environ.get("FASTDPO_CHECK", "") not in ("", "0"):
        return True
    if torch.compiler.is_compiling():
        return False
    return device.type == "cpu"


def require(cond: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless the one-element bool tensor ``cond`` is true.

    While torch.compile traces, the check becomes part of the graph (``torch._assert_async``):
    the compiled code raises ``RuntimeError(message)`` when it runs (on CUDA, a device-side
    assert). Call it only in checked mode: eagerly it reads ``cond`` (a sync on CUDA).
    """
    if torch.compiler.is_compiling():
        torch._assert_async(cond, message)
    elif not bool(cond):
        raise ValueError(message)


# ------------------------------------------------------------------------ scalar checks


def _is_real(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def check_finite(name: str, v) -> float:
    """``v`` as a float; TypeError unless a real number (not a bool), ValueError unless finite."""
    if not _is_real(v):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_positive_finite(name: str, v) -> float:
    """``v`` as a float; as :func:`check_finite`, and ValueError unless ``v > 0``."""
    v = check_finite(name, v)
    if v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v}")
    return v


def check_int(name: str, v, *, minimum: int | None = None) -> int:
    """``v`` as an int; TypeError unless an integer (not a bool), ValueError below ``minimum``
    or outside int64."""
    if not isinstance(v, Integral) or isinstance(v, bool):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    v = int(v)
    lo = _INT64[0] if minimum is None else minimum
    if not lo <= v <= _INT64[1]:
        raise ValueError(f"{name} must be an integer in [{lo}, {_INT64[1]}], got {v}")
    return v


def _is_bool(v) -> bool:
    return isinstance(v, bool) or (type(v).__module__ == "numpy"
                                   and type(v).__name__ in ("bool", "bool_"))


def check_bool(name: str, v) -> bool:
    """``v`` as a bool; TypeError for anything else (an int, a tensor)."""
    if not _is_bool(v):
        raise TypeError(f"{name} must be True or False, got {v!r} ({type(v).__name__})")
    return bool(v)


def check_optional_bool(name: str, v) -> bool | None:
    return None if v is None else check_bool(name, v)


def check_choice(name: str, v, choices: tuple) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {v!r}")
    return v


def check_temperature(temperature) -> float:
    """A finite temperature > 0 whose reciprocal is finite in fp32 (the kernels scale by it)."""
    t = check_positive_finite("temperature", temperature)
    if 1.0 / t > _FP32_MAX:
        raise ValueError(f"temperature must be at least {1.0 / _FP32_MAX:.3g} (its reciprocal "
                         f"must be finite in fp32), got {t}")
    return t


def check_logit_transform(logit_scale, softcap) -> None:
    """The fused head's ``logit_scale`` (finite, non-zero) and ``softcap`` (None or > 0)."""
    if check_finite("logit_scale", logit_scale) == 0:
        raise ValueError("logit_scale must be non-zero")
    if softcap is not None:
        check_positive_finite("softcap", softcap)


def check_options(*, ignore_index, temperature, backend, validate, **flags) -> float:
    """The scalar arguments of every public log-prob function; ``flags`` are bool arguments by
    name. Returns the temperature as a float."""
    check_int("ignore_index", ignore_index)
    check_choice("backend", backend, BACKEND_CHOICES)
    check_optional_bool("validate", validate)
    for name, v in flags.items():
        check_bool(name, v)
    return check_temperature(temperature)


# ------------------------------------------------------------------------ tensor checks


def check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp32, bf16, fp16 or fp64), got "
                        f"{t.dtype}")


def check_index(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ValueError(f"{k} is on {v.device} but {items[0][0]} is on {dev}")


def check_logits_labels(logits, labels, *, shift: bool) -> None:
    check_float("logits", logits)
    check_index("labels", labels)
    check_same_device(logits=logits, labels=labels)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (B, T, V) or (N, V), got shape {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])} to match logits "
                         f"{tuple(logits.shape)}, got {tuple(labels.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        raise ValueError(f"logits must have unit stride along the vocabulary dimension, got "
                         f"strides {tuple(logits.stride())}")
    if shift and logits.shape[-2] < 1:
        raise ValueError("shift=True needs at least one position")


def check_no_overlap(name: str, t) -> None:
    """``inplace_backward`` writes one gradient per element: elements must not share memory."""
    extent = 0  # elements spanned by the faster dims; a slower stride must step past them
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= extent:
            break
        extent += stride * (size - 1)
    else:
        return
    if t.numel() > 1:
        raise ValueError(f"inplace_backward=True needs {name} whose elements do not overlap in "
                         "memory (not an expand()ed or otherwise self-overlapping view); pass "
                         f"contiguous {name} or inplace_backward=False")


def check_label_values(labels, ignore_index: int, vocab_total: int, name: str = "labels") -> None:
    """Checked mode: every label is ``ignore_index`` or in ``[0, vocab_total)``."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_total))
    msg = f"{name} must lie in [0, {vocab_total}) or equal ignore_index={ignore_index}"
    if torch.compiler.is_compiling():
        require(~bad.any(), msg)
    elif bool(bad.any()):
        raise ValueError(f"{msg}; found {labels[bad].flatten()[0].item()}")


def check_token_weights(token_weights, labels) -> None:
    check_float("token_weights", token_weights)
    check_same_device(labels=labels, token_weights=token_weights)
    if tuple(token_weights.shape) != tuple(labels.shape):
        raise ValueError(f"token_weights must have the shape of labels {tuple(labels.shape)}, "
                         f"got {tuple(token_weights.shape)}")


def check_cu_seqlens(cu_seqlens, labels, checked: bool) -> None:
    """Packed-batch offsets ``[0, ..., total]`` for ``labels`` ``(total,)`` or ``(1, total)``."""
    check_index("cu_seqlens", cu_seqlens)
    check_same_device(labels=labels, cu_seqlens=cu_seqlens)
    if labels.dim() == 2 and labels.shape[0] != 1:
        raise ValueError("cu_seqlens needs a packed batch: logits (1, total, V) or (total, V)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be 1-D with at least two entries (0, ..., total)")
    if not checked:
        return
    total = labels.shape[-1]
    ends = f"cu_seqlens must start at 0 and end at the total token count {total}"
    order = "cu_seqlens must be non-decreasing"
    if torch.compiler.is_compiling():
        require((cu_seqlens[0] == 0) & (cu_seqlens[-1] == total), ends)
        require((cu_seqlens[1:] >= cu_seqlens[:-1]).all(), order)
        return
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != total:
        raise ValueError(f"{ends}, got {first} .. {last}")
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(order)
