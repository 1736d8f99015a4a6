"""The autograd Function of the losses: closed-form backward, no graph through the formulas.

Forward evaluates the per-example losses together with their derivatives in fp32 (fp64 when an
input is fp64) and keeps the ``O(B)`` derivative tensors; backward scales them by the upstream
gradient. Inputs that need no gradient get ``None``.
"""

from __future__ import annotations

import torch

from ..autograd.options import refuse_double_backward
from .functional import LossConfig, PairInputs, combined

# Positional order of the differentiable DPO-family inputs, and their names in the VJP dicts.
_NAMES = ("pc", "pr", "rc", "rr", "s", "m")


def compute_dtype(*tensors) -> torch.dtype:
    return (torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors)
            else torch.float32)


def _reduce(per: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    return per.contiguous()  # an NLL / sft per-pair loss is an expanded scalar


class ClosedFormLoss(torch.autograd.Function):
    """A loss whose forward also returns its derivatives: ``formula(*inputs)`` (inputs detached,
    in the compute dtype; ``None`` stays ``None``) gives the per-example loss ``(N,)`` and
    ``vjp(g)``, mapping the per-example upstream gradient to one gradient (or ``None``) per
    input. Backward is that multiply; nothing but the ``O(N)`` derivatives is kept."""

    @staticmethod
    def forward(ctx, formula, reduction: str, *inputs):
        dt = compute_dtype(*inputs)
        per, vjp = formula(*(None if t is None else t.detach().to(dt) for t in inputs))
        ctx.vjp, ctx.n, ctx.reduction = vjp, per.shape[0], reduction
        ctx.dtypes = tuple(None if t is None else t.dtype for t in inputs)
        ctx.shapes = tuple(None if t is None else t.shape for t in inputs)
        return _reduce(per, reduction)

    @staticmethod
    def backward(ctx, grad):
        # not once_differentiable: it runs backward without grad mode, hiding create_graph
        refuse_double_backward("the DPO-family losses")
        if ctx.reduction == "none":
            g = grad
        else:
            g = grad.expand(ctx.n) / ctx.n if ctx.reduction == "mean" else grad.expand(ctx.n)
        grads = ctx.vjp(g)
        out = []
        for i, v in enumerate(grads):
            if not ctx.needs_input_grad[i + 2]:
                out.append(None)
            elif v is None:
                out.append(torch.zeros(ctx.shapes[i], dtype=ctx.dtypes[i], device=grad.device))
            else:
                out.append(v.to(ctx.dtypes[i]).expand(ctx.shapes[i]))
        return (None, None, *out)


def preference_loss(pc, pr, rc, rr, s, m, nc, nr, bco_delta, cfg: LossConfig) -> torch.Tensor:
    """The DPO-family loss (``functional.combined``) of the pair inputs, reduced as configured;
    ``nc``/``nr`` (lengths) and ``bco_delta`` are not differentiated."""
    def formula(pc, pr, rc, rr, s, m):
        dt = pc.dtype

        def cast(t):
            return t.detach().to(dt) if torch.is_tensor(t) else t

        per, vjp = combined(PairInputs(pc=pc, pr=pr, rc=rc, rr=rr, s=s, m=m, nc=cast(nc),
                                       nr=cast(nr), bco_delta=cast(bco_delta)), cfg)
        return per, lambda g: tuple(map(vjp(g).get, _NAMES))

    return ClosedFormLoss.apply(formula, cfg.reduction, pc, pr, rc, rr, s, m)
