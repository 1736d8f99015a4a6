"""The options an autograd Function of the row ops carries from forward to backward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RowOptions:
    """Scalar arguments of the row contract (:mod:`fastdpo.ops`) plus the layout around it.

    ``shards`` (a :class:`fastdpo.distributed.Shards`) combines the row statistics of
    vocabulary-parallel shards; None on a single device.
    """

    backend: str
    ignore_index: int = -100
    temperature: float = 1.0
    vocab_start: int = 0
    vocab_total: int = 0
    with_entropy: bool = False
    entropy_grad: bool = True        # False: the entropy is a metric (no gradient flows to it)
    shift: bool = False
    inplace_backward: bool = False   # logits path only
    logit_scale: float = 1.0         # fused LM head only
    softcap: float = 0.0             # fused LM head only; 0 = off
    batch_invariant: bool = False    # fused LM head only (the logits path always is)
    shards: Any = None

    def row_args(self):
        """``(ignore_index, temperature, vocab_start, vocab_total)`` as the ops take them."""
        return (self.ignore_index, float(self.temperature), self.vocab_start, self.vocab_total)


def refuse_double_backward(what: str) -> None:
    """The backward ops are closed-form kernels with no graph of their own: a second-order
    gradient through them would silently be 0, so ask for one is an error."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{what} does not support double backward (create_graph=True): its "
                           "gradient is a closed-form kernel with no graph of its own")
