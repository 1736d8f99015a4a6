"""Everything the Triton backend does only because of ``TRITON_INTERPRET=1`` (CPU tests).

The kernels and launchers carry no interpreter code. :func:`install` (run when the kernel modules
are imported under the interpreter) corrects four places where the interpreter departs from
what a GPU computes, so that the CPU tests check the GPU's semantics:

* fp32 -> bf16 casts truncate; GPUs round to nearest even (``cvt.rn.bf16.f32``).
* ``tl.dot`` multiplies the raw bit patterns of bf16 operands (Triton issue 11584); GPUs
  multiply the values exactly and accumulate in fp32.
* ``tl.dot`` is ``np.matmul``: the host BLAS, whose micro-kernels round a row's products
  differently by its place in the tile (OpenBLAS 0.3.31 with the Haswell core type on an AVX-512
  EPYC), so a row's result depended on its batch; a GPU forms each output from its own row and
  column. Here floating dots are summed exactly (fp64 products of fp32 values are exact) in a
  fixed order and rounded once: the same for a row wherever it sits.
* Triton 3.6 turns a loop bound (a shape ``(1,)`` array) into an int with ``int(array)``, which
  numpy >= 2.4 refuses; later releases take the array's single item, as here.

The patches touch only the interpreter's builder, so they act on every interpreted kernel of the
process (more faithfully to the GPU for all of them), never on compiled ones. :func:`quiet`
silences numpy's warnings about the IEEE inf/NaN arithmetic the kernels rely on.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

from .. import backends


def active() -> bool:
    return backends.triton_interpreted()


def quiet():
    """Silence numpy's floating-point warnings around an interpreted launch."""
    if active():
        return np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore")
    return contextlib.nullcontext()


def bf16_bits_rtne(x) -> np.ndarray:
    """fp32 values -> bf16 bit patterns, rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    quiet_nan = (bits >> 16) | np.uint32(0x40)
    return np.where(np.isnan(x), quiet_nan, rounded).astype(np.uint16)


def _patch_builder(interpreter, tl) -> None:
    builder = interpreter.InterpreterBuilder
    cast, dot = builder.cast_impl, builder.create_dot

    @functools.wraps(cast)
    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(bf16_bits_rtne(src.data), tl.bfloat16)
        return cast(self, src, dst_type)

    @functools.wraps(dot)
    def create_dot(self, a, b, d, *args, **kwargs):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            a, b = (cast(self, t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t
                    for t in (a, b))
        exact = (tl.float32, tl.float16)
        if a.dtype.scalar in exact and b.dtype.scalar in exact and d.dtype.scalar == tl.float32:
            # (.., M, K, 1) * (.., 1, K, N) summed over K: each output's own row and column only
            prod = a.data.astype(np.float64)[..., :, :, None] * b.data.astype(np.float64)[..., None, :, :]
            return interpreter.TensorHandle((prod.sum(axis=-2).astype(np.float32) + d.data),
                                            d.dtype.scalar)
        return dot(self, a, b, d, *args, **kwargs)

    builder.cast_impl, builder.create_dot = cast_impl, create_dot


def _patch_index(interpreter) -> None:
    try:
        int(np.zeros(1))
        return  # numpy still converts size-1 arrays
    except TypeError:
        pass
    patch = interpreter._patch_lang_tensor

    @functools.wraps(patch)
    def fixed(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).item()))

    interpreter._patch_lang_tensor = fixed


def install() -> None:
    """Apply the corrections once per process, only under the interpreter."""
    if not active():
        return
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_fastdpo_patched", False):
        return
    _patch_builder(interpreter, tl)
    _patch_index(interpreter)
    interpreter._fastdpo_patched = True
