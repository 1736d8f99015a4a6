"""Argument checks shared by the public functions. Messages name the argument at fault.

Checks that need the values of a tensor (label range, ``cu_seqlens`` order) read device memory, so
they run only in checked mode: on by default for CPU tensors, off for CUDA tensors, where they
would synchronise the host. ``FASTDPO_CHECK=1`` or ``validate=True`` turns them on everywhere.
"""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def checked_mode(validate: bool | None, device: torch.device) -> bool:
    if torch.compiler.is_compiling():  # value checks would break the graph; eager runs check
        return False
    if validate is not None:
        return bool(validate)
    if os.environ.get("FASTDPO_CHECK", "") not in ("", "0"):
        return True
    return device.type == "cpu"


def check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp32, bf16, fp16 or fp64), got {t.dtype}")


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


def check_temperature(temperature) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def check_label_values(labels, ignore_index: int, vocab_total: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_total))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(f"labels must lie in [0, {vocab_total}) or equal ignore_index="
                         f"{ignore_index}; found {first}")


def check_token_weights(token_weights, labels) -> None:
    check_float("token_weights", token_weights)
    check_same_device(labels=labels, token_weights=token_weights)
    if tuple(token_weights.shape) != tuple(labels.shape):
        raise ValueError(f"token_weights must have the shape of labels {tuple(labels.shape)}, "
                         f"got {tuple(token_weights.shape)}")


def check_cu_seqlens(cu_seqlens, total: int, checked: bool) -> None:
    check_index("cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be 1-D with at least two entries (0, ..., total)")
    if checked:
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
            raise ValueError(f"cu_seqlens must start at 0 and end at the total token count {total}, "
                             f"got {int(cu_seqlens[0])} .. {int(cu_seqlens[-1])}")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
