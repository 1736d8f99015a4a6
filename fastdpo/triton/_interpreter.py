"""Everything the Triton backend does only because of ``TRITON_INTERPRET=1`` (CPU tests).

The kernels themselves carry no interpreter code; the launchers route their tensors through these
helpers, which are no-ops for compiled kernels:

* :func:`quiet`: numpy warns about the IEEE inf/NaN arithmetic the kernels rely on.
* :func:`dot_operands`: the interpreter's ``tl.dot`` multiplies the raw bit patterns of bf16
  operands (Triton issue 11584), so bf16 matmul operands are handed over as fp32 (exact).
* :func:`rounded_output`: the interpreter truncates fp32 -> bf16 where GPUs round to nearest
  even, so bf16 outputs are written as fp32 and rounded by torch.
* :func:`install`: Triton 3.6's interpreter turns a loop bound (a shape ``(1,)`` array) into an
  int with ``int(array)``, which numpy >= 2.4 refuses; 3.9 squeezes first. The same fix here.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .. import backends


def active() -> bool:
    return backends.triton_interpreted()


def quiet():
    """Silence numpy's floating-point warnings around an interpreted launch."""
    if active():
        return np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore")
    return contextlib.nullcontext()


def dot_operands(a, b):
    """``tl.dot(a, b.to(a.dtype))`` operands: unchanged, or under the interpreter for bf16 ``a``
    the values a GPU would multiply (``b`` rounded to bf16), as fp32."""
    if active() and a.dtype == torch.bfloat16:
        return a.float(), b.to(torch.bfloat16).float()
    return a, b


@contextlib.contextmanager
def rounded_output(out: torch.Tensor):
    """Yields the tensor a kernel should write ``out``'s values into: ``out`` itself, or under the
    interpreter for bf16 an fp32 buffer that is rounded into ``out`` on exit."""
    if not (active() and out.dtype == torch.bfloat16):
        yield out
        return
    buf = torch.empty(out.shape, dtype=torch.float32, device=out.device)
    yield buf
    out.copy_(buf)


def _needs_index_fix() -> bool:
    try:
        int(np.zeros(1))
    except TypeError:
        return True
    return False


def install() -> None:
    """Patch the interpreter's tensor-to-int conversion when it cannot take shape (1,) arrays."""
    if not active() or not _needs_index_fix():
        return
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_fastdpo_fixed", False):
        return

    def fixed(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).item()))

    fixed._fastdpo_fixed = True
    interpreter._patch_lang_tensor = fixed
