"""Argument checks shared by the loss functions; every message names the argument at fault."""

from __future__ import annotations

import torch

from .. import _validate

REDUCTIONS = ("mean", "sum", "none")


def check_logps(names: tuple[str, ...], tensors: tuple) -> None:
    """Floating ``(B,)`` tensors, ``B >= 1``, all of the first one's shape and device."""
    for n, t in zip(names, tensors):
        _validate.check_float(n, t)
    first = tensors[0]
    if first.dim() != 1 or first.shape[0] == 0:
        raise ValueError(f"{names[0]} must be a non-empty 1-D tensor (B,), got shape "
                         f"{tuple(first.shape)}")
    for n, t in zip(names[1:], tensors[1:]):
        if tuple(t.shape) != tuple(first.shape):
            raise ValueError(f"{n} must have the shape of {names[0]} {tuple(first.shape)}, got "
                             f"{tuple(t.shape)}")
    _validate.check_same_device(**dict(zip(names, tensors)))


def check_pair_tensor(name: str, t, like: torch.Tensor, *, integer_ok: bool = False) -> None:
    """One value per pair (or example): ``like``'s shape and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point() or (integer_ok and not t.is_complex() and t.dtype != torch.bool)):
        kind = "a floating or integer" if integer_ok else "a floating"
        raise TypeError(f"{name} must be {kind} tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have shape {tuple(like.shape)} (one value per pair), "
                         f"got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the log-probs are on {like.device}")


def check_reduction(reduction) -> str:
    return _validate.check_choice("reduction", reduction, REDUCTIONS)


def check_lengths(chosen_lengths, rejected_lengths, like: torch.Tensor) -> None:
    for n, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if t is not None:
            check_pair_tensor(n, t, like, integer_ok=True)


def loss_types(loss_type, valid: tuple[str, ...], *, many: bool = True) -> tuple[str, ...]:
    """``loss_type`` (a name, or with ``many`` a list of names) as a tuple of valid names."""
    if isinstance(loss_type, str):
        types = (loss_type,)
    elif many and isinstance(loss_type, (list, tuple)):
        types = tuple(loss_type)
        if not types:
            raise ValueError("loss_type must name at least one loss type")
    else:
        what = "a loss type name or a list of them" if many else "a loss type name"
        raise TypeError(f"loss_type must be {what} ({', '.join(valid)}), got "
                        f"{type(loss_type).__name__}")
    for t in types:
        if not isinstance(t, str):
            raise TypeError(f"loss_type entries must be strings, got {type(t).__name__}")
        if t not in valid:
            raise ValueError(f"unknown loss_type {t!r}; valid loss types: {', '.join(valid)}")
    return types


def loss_weights(weights, n: int) -> tuple[float, ...]:
    """One finite weight per loss type (default 1 each)."""
    if weights is None:
        return (1.0,) * n
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"loss_weights must be a list of numbers, got {type(weights).__name__}")
    if len(weights) != n:
        raise ValueError(f"loss_weights must have one weight per loss type: got {len(weights)} "
                         f"for {n} loss types")
    return tuple(_validate.check_finite(f"loss_weights[{i}]", w) for i, w in enumerate(weights))


def check_delta(name: str, v):
    """A number or a one-element floating tensor (detached, reshaped to a scalar)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or not v.is_floating_point():
            raise ValueError(f"{name} must be a number or a one-element floating tensor")
        return v.detach().reshape(())
    return _validate.check_finite(name, v)


def require_values(validate, like: torch.Tensor, cond_fn, message: str) -> None:
    """Checked mode only: ``cond_fn()`` (a one-element bool tensor) must hold; also honoured
    inside ``torch.compile`` (an assertion in the graph)."""
    if _validate.checked_mode(validate, like.device):
        _validate.require(cond_fn(), message)
