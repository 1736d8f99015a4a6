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
from typing import NamedTuple

import torch

from . import linear as TL
from . import logps as TK

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SMS = 132  # streaming multiprocessors of an H100/H200 SXM: sets the forward's vocabulary splits
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.int32: "i32", torch.int64: "i64"}


class Spec(NamedTuple):
    name: str
    kernel: object  # the triton JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


def _meta(shape, dtype, aligned=True):
    if aligned:
        return torch.empty(shape, dtype=dtype, device="meta")
    n = 1
    for d in shape:
        n *= d
    return torch.empty(n + 1, dtype=dtype, device="meta")[1:].view(shape)


def specialize(name, kernel, args, meta) -> Spec:
    """The spec of ``kernel[grid](*args, **meta)`` as the JIT would compile it."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    if not hasattr(kernel, "arg_names") or type(kernel).__name__ == "InterpretedFunction":
        raise RuntimeError("ahead-of-time compilation needs a process without TRITON_INTERPRET=1 "
                           "(the kernels were built for the interpreter)")
    meta = dict(meta)
    options = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
    options["enable_fp_fusion"] = True
    names = list(kernel.arg_names)
    values = dict(zip(names, args))
    missing = [n for n in names[len(args):] if n not in meta]
    if missing or len(args) > len(names):
        raise ValueError(f"{name}: arguments do not match {names} (missing {missing})")
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


def logits_spec(op, B, T, V, dtype, label_dtype=torch.int64, with_entropy=False, aligned=True):
    """The ``logps_fwd`` / ``logps_bwd`` kernel for ``(B, T, V)`` logits."""
    x = _meta((B, T, V), dtype, aligned)
    lab = _meta((B, T), label_dtype)
    row = _meta((B, T), torch.float32)
    tag = f"{_SHORT[dtype]},{_SHORT[label_dtype]}" + (",entropy" if with_entropy else "")
    tag += "" if aligned else ",unaligned"
    if op == "fwd":
        outs = (row, row, row, row if with_entropy else _meta((0,), torch.float32))
        k, _, args, meta = TK.fwd_launch(x, lab, outs, -100, 1.0, 0, V, with_entropy,
                                         interpreted=False)
    else:
        k, _, args, meta = TK.bwd_launch(row, row if with_entropy else None, x, lab, row, row,
                                         row if with_entropy else None, -100, 1.0, 0, V, x,
                                         interpreted=False)
    return specialize(f"logps_{op}[{tag}](B={B},T={T},V={V})", k, args, meta)


def _flags(tag, bias, softcap, entropy, ent_name):
    return tag + "".join(f",{n}" for n, on in (("bias", bias), ("softcap", softcap),
                                                (ent_name, entropy)) if on)


def linear_fwd_spec(N, H, V, dtype, weight_dtype=None, bias=True, softcap=False,
                    with_entropy=False, label_dtype=torch.int64, sms=SMS):
    """The fused-linear forward kernel for ``N`` tokens, hidden size ``H``, vocabulary ``V``."""
    weight_dtype = weight_dtype or dtype
    BN, BV = TL._config(dtype, torch.device("meta"), interpreted=False)[:2]
    S, per = TL._splits(-(-N // BN), -(-V // BV), torch.device("meta"), sms=sms)
    h, w = _meta((N, H), dtype), _meta((V, H), weight_dtype)
    b = _meta((V,), dtype) if bias else None
    k, _, args, meta = TL.fwd_launch(h, w, b, _meta((N,), label_dtype),
                                     _meta((4, S, N), torch.float32), -100, 1.0, 1.0,
                                     3.0 if softcap else 0.0, 0, with_entropy, per=per,
                                     interpreted=False)
    tag = _SHORT[dtype] + ("" if weight_dtype == dtype else f",w={_SHORT[weight_dtype]}")
    tag = _flags(f"{tag},{_SHORT[label_dtype]}", bias, softcap, with_entropy, "entropy")
    return specialize(f"linear_fwd[{tag}](N={N},H={H},V={V})", k, args, meta)


def linear_grad_specs(N, H, V, dtype, bias=True, softcap=False, with_entropy=False,
                      label_dtype=torch.int64):
    """The gradient-tile kernel for every chunk shape the backward loop uses at ``(N, H, V)``
    (full chunks and the remainders, whose sizes change the specialisation)."""
    from ..chunked import linear as chunked

    p = chunked.plan(N, V, H, torch.empty((), dtype=dtype).element_size(),
                     tile_bytes=torch.empty((), dtype=dtype).element_size(),
                     hidden_acc=dtype != torch.float32)
    sizes_n = sorted({min(p.tile_rows, N), N % p.tile_rows or min(p.tile_rows, N)})
    sizes_v = sorted({min(p.tile_cols, V), V % p.tile_cols or min(p.tile_cols, V)})
    out = []
    for n, v in itertools.product(sizes_n, sizes_v):
        row = _meta((n,), torch.float32)
        ge = row if with_entropy else None
        k, _, args, meta = TL.grad_launch(
            _meta((n, H), dtype), _meta((v, H), dtype), _meta((v,), dtype) if bias else None,
            _meta((n,), label_dtype), row, row, ge, row, ge, _meta((n, v), dtype), -100, 1.0,
            1.0, 3.0 if softcap else 0.0, 0, V, interpreted=False)
        tag = _flags(f"{_SHORT[dtype]},{_SHORT[label_dtype]}", bias, softcap, with_entropy,
                     "entropy")
        out.append(specialize(f"linear_grad_tile[{tag}](n={n},H={H},v={v})", k, args, meta))
    return out


def _key(spec: Spec):
    return (spec.kernel.__name__ if hasattr(spec.kernel, "__name__") else str(spec.kernel),
            tuple(sorted(spec.signature.items())), tuple(sorted(map(str, spec.constexprs.items()))),
            tuple(sorted(map(str, spec.attrs.items()))), tuple(sorted(spec.options.items())))


def compile_specs(shapes, dtypes=DTYPES, label_dtypes=(torch.int64,), mixed_weight=True,
                  sms=SMS) -> list[Spec]:
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
                add(linear_fwd_spec(B * T, H, V, dtype, wdt, bias, cap, ent, lab, sms))
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
