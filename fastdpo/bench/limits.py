"""Per-row limits of a heavy preset: a (case, implementation) predicted to exceed the preset's time
limit per row, or the memory free right now, is skipped before it starts, and its row says why.

A step cannot be interrupted in the middle (it runs in this process), so the limits act on
predictions:

* time: one step ~ ``x_gemm * gemm_s``, ``gemm_s`` the same run's bare-GEMM time of the case
  (:mod:`.ceilings`) and ``x_gemm`` the implementation's multiple measured on the same workload's
  previous case of this run (the presets run small shapes first), else :data:`PRIOR_X_GEMM`;
  the row costs ``(warm-up + repeats)`` steps plus compile time. A row that ran past the limit
  anyway is kept and marked ``over_row_limit``.
* memory: inputs + gradients + :data:`PRIOR_X_LOGITS` fp32 ``(N, V)`` logits of extra, against
  :data:`MEMORY_SHARE` of ``MemAvailable`` read just before the row.
"""

from __future__ import annotations

import torch

from .workloads import Case
from .machine import meminfo_bytes

# Multiple of the bare GEMMs an implementation is assumed to take before this run measured it
# (the quick preset's CPU figures, rounded up).
PRIOR_X_GEMM = {"fastdpo[native]": 1.5, "fastdpo[torch]": 2.5, "eager": 2.5,
                "torch.compile": 2.0, "cce[torch_compile]": 2.0, "trl.chunked_logprob": 3.0,
                "liger.fused_linear_dpo": 2.0}
DEFAULT_X_GEMM = 3.0
# Extra memory of a step beyond inputs and gradients, in fp32 (N, V) logits: eager holds the
# logits, log_softmax and their gradients (the reference pass adds its own while it runs);
# the compiled ones fuse some of it; the chunked ones hold chunks.
PRIOR_X_LOGITS = {"eager": 4.0, "torch.compile": 3.0, "cce[torch_compile]": 3.0,
                  "liger.fused_linear_dpo": 1.5, "trl.chunked_logprob": 0.5}
DEFAULT_X_LOGITS = 4.0
FASTDPO_X_LOGITS = 0.25
MEMORY_SHARE = 0.85
COMPILE_S = {"cpu": 30.0, "cuda": 30.0}
COMPILES = ("torch.compile", "cce[torch_compile]", "liger.fused_linear_dpo")


def mem_available_bytes() -> int | None:
    return meminfo_bytes("MemAvailable")


def fp32_logits_bytes(case: Case) -> int:
    return case.tokens * case.vocab * 4


def grads_bytes(case: Case) -> int:
    """Bytes of the gradients a linear step returns (``d_hidden``, and ``d_weight`` unless the
    head is frozen): outputs every implementation must hold, whatever its scratch memory."""
    if not case.gemms():
        return 0
    item = case.torch_dtype.itemsize
    weight = 0 if case.frozen_head else case.vocab * case.hidden
    return item * (case.tokens * case.hidden + weight)


def linear_inputs_bytes(case: Case) -> int:
    item = case.torch_dtype.itemsize
    one = item * (case.tokens * case.hidden + case.vocab * case.hidden) + 8 * case.tokens
    return one * (2 if case.kind == "linear_dpo" else 1)


def predicted_peak_bytes(case: Case, impl) -> int:
    """Inputs + gradients + the implementation's assumed scratch (module doc)."""
    x = FASTDPO_X_LOGITS if impl.family == "fastdpo" else PRIOR_X_LOGITS.get(impl.name,
                                                                              DEFAULT_X_LOGITS)
    return int(linear_inputs_bytes(case) + grads_bytes(case) + x * fp32_logits_bytes(case))


class RowLimits:
    """Skip decisions of one run: the limit, the same run's ceilings and what it measured."""

    def __init__(self, row_limit_s: float | None, ceiling=None, device="cpu",
                 memory_bytes=None):
        self.row_limit_s = row_limit_s
        self.ceiling = ceiling
        self.device = torch.device(device)
        self.memory_bytes = memory_bytes  # None: MemAvailable before each row (CPU only)
        self.x_gemm: dict[tuple, float] = {}  # (impl, workload) -> last measured multiple

    def observe(self, row: dict) -> None:
        if row.get("status") == "ok" and row.get("x_gemm") is not None:
            self.x_gemm[(row["impl"], row["workload"])] = row["x_gemm"]
        if self.row_limit_s is not None and row.get("wall_s", 0.0) > self.row_limit_s:
            row["over_row_limit"] = True

    def predicted_s(self, case: Case, impl, warmup: int, repeats: int) -> tuple[float, str]:
        g = self.ceiling.gemm_for(case) if self.ceiling is not None else {}
        if "median_s" not in g:
            return 0.0, "no bare-GEMM time to predict from"
        seen = self.x_gemm.get((impl.name, case.workload))
        x = seen if seen is not None else PRIOR_X_GEMM.get(impl.name, DEFAULT_X_GEMM)
        how = "as measured on this run's previous case" if seen is not None else "assumed"
        extra = COMPILE_S[self.device.type] if impl.name in COMPILES and warmup else 0.0
        return (warmup + repeats) * x * g["median_s"] + extra, f"{x:.2f}x GEMMs {how}"

    def skip_reason(self, case: Case, impl, warmup: int, repeats: int) -> str:
        """Why (case, impl) is not started ("" to run it)."""
        if not case.gemms():
            return ""
        free = self.memory_bytes
        if free is None and self.device.type == "cpu":
            free = mem_available_bytes()
        if free is not None:
            need = predicted_peak_bytes(case, impl)
            if need > MEMORY_SHARE * free:
                return (f"predicted peak {need / 2**30:.1f} GiB exceeds {MEMORY_SHARE:.0%} of "
                        f"the {free / 2**30:.1f} GiB available")
        if self.row_limit_s is None:
            return ""
        t, how = self.predicted_s(case, impl, warmup, repeats)
        if t > self.row_limit_s:
            return (f"predicted {t:.0f} s ({warmup} warm-up + {repeats} timed, {how}) exceeds "
                    f"the row limit of {self.row_limit_s:g} s")
        return ""
