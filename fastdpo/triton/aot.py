"""Ahead-of-time compilation specs for every kernel variant the launchers can pick (no GPU).

A spec is built by running the launchers' own argument assembly (``fwd_launch``, ``bwd_launch``,
``grad_launch``) on meta tensors of the requested shapes and specialising each argument exactly
as the JIT does (dtype, 16-divisibility, integers equal to 1 become constants), so what is
compiled here is what a GPU run would compile. Usage::

    from fastdpo.triton import aot
    for spec in aot.compile_specs([(4, 2048, 4096, 128256)]):   # (B, T, H, V)
        kernel = aot.compile(spec, cc=90)                      # kernel.asm["cubin"], ["ptx"], ...
"""

from __future__ import annotations

import itertools

import torch

from . import linear as TL
from . import logps as TK
from ._launch import Spec, specialize  # noqa: F401  (re-exported)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
logits_spec = TK.logits_spec
linear_fwd_spec = TL.fwd_spec
linear_grad_specs = TL.grad_specs


def _key(spec: Spec):
    return (getattr(spec.kernel, "__name__", str(spec.kernel)),
            tuple(sorted(spec.signature.items())), tuple(sorted(map(str, spec.constexprs.items()))),
            tuple(sorted(map(str, spec.attrs.items()))), tuple(sorted(spec.options.items())))


def compile_specs(shapes, dtypes=DTYPES, label_dtypes=(torch.int64,),
                  mixed_weight=True) -> list[Spec]:
    """Specs of every kernel variant the launchers pick at ``shapes``: ``(B, T, H, V)`` tuples
    (logits ``(B, T, V)``; fused head ``N = B * T`` tokens of hidden size ``H``).

    Covers, per dtype: the logits forward with/without entropy and backward with/without the
    entropy gradient; the fused-linear forward and gradient tile for each combination of bias,
    soft-cap and entropy, the latter at every chunk shape of the backward loop; with
    ``mixed_weight`` the forward with an fp32 weight and bf16/fp16 hidden states. Variants that
    specialise identically are listed once; names are unique.
    """
    specs, seen = [], set()

    def add(spec):
        k = _key(spec)
        if k not in seen:
            seen.add(k)
            specs.append(spec)

    for (B, T, H, V), dtype, lab in itertools.product(shapes, dtypes, label_dtypes):
        for op, ent in itertools.product(("fwd", "bwd"), (False, True)):
            add(logits_spec(op, B, T, V, dtype, lab, ent))
        wdts = [dtype] + ([torch.float32] if mixed_weight and dtype != torch.float32 else [])
        for bias, cap, ent in itertools.product((False, True), repeat=3):
            for wdt in wdts:
                add(linear_fwd_spec(B * T, H, V, dtype, wdt, bias, cap, ent, lab))
            for spec in linear_grad_specs(B * T, H, V, dtype, bias, cap, ent, lab):
                add(spec)
    return specs


def compile(spec: Spec, cc: int = 90):  # noqa: A001 - mirrors triton.compile
    """``triton.compile`` of ``spec`` for ``sm_<cc>`` (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=spec.kernel, signature=spec.signature,
                                    constexprs=spec.constexprs, attrs=spec.attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=spec.options)
