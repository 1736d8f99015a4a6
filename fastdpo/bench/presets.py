"""What each ``fastdpo bench`` preset runs: cases in run order, repeats, and what it leaves out.

* ``quick`` (the default; CPU: <= 4 minutes on 2 cores): the native CPU target, the reference
  pass, the DPO steps (from logits and through the LM head), the fused LM head (trained and
  frozen), and the memory headline (the target's peaks and the fused head against eager).
* ``full``: every vocabulary, more token counts and dtypes, the whole memory sweep.
* ``gpu``: the GPU machine's verdict, sized for a few minutes of one H200: logits path forward,
  forward + backward and reference pass at V = 32000 ... 256000, N = 4096 and 16384, bf16 and
  fp32; the fused LM head at H = 4096; the DPO steps. Its most important cases come first, so a
  time limit (``--time-limit``) cuts the least important. On a CPU the same preset runs at tiny
  sizes: the dry run of the GPU job.
* ``lmhead-goals``: the fused LM head at the issue's goal shapes, fp32 ``(N, H, V)`` = (1024,
  512, 32000), (2048, 256, 128256), (4096, 1024, 128256): the DPO step (reference + policy forward
  + backward) and the frozen-head policy pass, against every peer wired up in :mod:`.impls`,
  each row's time as a multiple of the same run's bare GEMMs, and the peak extra memory against
  one chunk's logits + 5% of the full logits (:mod:`.lmhead`). Heavy on purpose (one GEMM of the
  last shape is ~1 TFLOP): smallest shape first, 5 timed repeats, one for a case above
  ``HEAVY_FLOPS`` (warm-up only where the first call compiles), each row's bare GEMMs timed again
  just before it (the machine drifts between rows), a time limit per row and a memory check
  (:mod:`.limits`), memory children one at a time.
* ``lmhead-busy`` (not a :class:`Preset`: its own job, :mod:`.busy`): the DPO step at the same
  shapes, timed quiet and beside one busy process in paired rounds, for the slowdown goal.
* ``trl-step`` (its own job too, :mod:`.trainer`): ``FastDPOTrainer``'s training step against
  its log-prob-pass route and TRL's ``DPOTrainer`` on a small random Llama with a large
  vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .impls import Impl, all_impls
from .workloads import VOCABS, Case

# The native backend's CPU target: fp32 logits, forward + backward, N = 2048, V = 128256.
NATIVE_TARGET = Case("logps_fwd_bwd", vocab=128256, tokens=2048, dtype="float32", batch=1)
NATIVE_TARGET_IMPLS = ("fastdpo[native]", "fastdpo[torch]", "eager", "torch.compile",
                       "trl.selective_log_softmax")
# Figures the target is judged against (speedup floors, peak-memory ceiling in logits sizes).
NATIVE_TARGET_GOALS = {"speedup_vs": {"eager": 8.0, "torch.compile": 5.0,
                                      "trl.selective_log_softmax": 3.0},
                       "peak_x_logits_max": 1.1}
# Goals of the GPU run: logits path against the same run's device-to-device copy (V >= 128k),
# fused LM head against the bare cuBLAS products of the same shapes.
GPU_GOALS = {"copy_fraction_min": 0.90, "copy_fraction_from_vocab": 128000, "x_gemm_max": 1.15}

COMPILING = ("torch.compile", "cce[torch_compile]")
# Implementations whose first call on a shape compiles (a timed call without a warm-up would
# time the compiler).
COMPILES_FIRST_CALL = COMPILING + ("liger.fused_linear_dpo",)

# The fused LM head's goal shapes (N, H, V), fp32 on CPU, and who they are measured against.
LMHEAD_GOAL_SHAPES = ((1024, 512, 32000), (2048, 256, 128256), (4096, 1024, 128256))
LMHEAD_GOAL_IMPLS = ("fastdpo[native]", "fastdpo[native,lean]", "fastdpo[native,workspace]",
                     "fastdpo[triton]", "eager", "torch.compile", "cce",
                     "cce[torch_compile]", "liger.fused_linear_dpo",
                     "liger.fused_linear_cross_entropy", "trl.chunked_logprob")
LMHEAD_ROW_LIMIT_S = 600.0
# A case of more FLOPs than this gets one timed repeat (and a warm-up only where it compiles).
HEAVY_FLOPS = 1e12
# Tokens per sequence of the goal cases (batch = N / this; a DPO batch is chosen + rejected).
LMHEAD_SEQ = 512


@dataclass(frozen=True)
class Preset:
    name: str
    cases: tuple  # Case, in run order
    warmup: int
    repeats: int
    max_seconds: float  # per (case, impl): stop adding repeats after this much timed work
    memory_cases: tuple  # Case for the memory profiler
    compile_at: tuple | None = None  # (vocab, tokens, dtype) where compiling peers run; None: all
    memory_impls: tuple | None = None  # implementations the memory profile covers; None: all
    memory_isolated: bool | None = None  # None: isolated processes on CPU, in-process on CUDA
    target_impls: tuple = NATIVE_TARGET_IMPLS
    impls: tuple | None = None  # implementations run when --impl is not given; None: all
    row_limit_s: float | None = None  # per (case, impl): skip what is predicted to take longer
    heavy_flops: float | None = None  # cases above: 1 timed repeat, warm-up only to compile
    memory_workers: int | None = None  # isolated memory children at a time (None: default)
    memory_saved: bool = True  # also count the bytes saved for backward (one more forward)
    adjacent_gemms: bool = False  # every fused-LM-head row against its GEMMs timed beside it
    files: str = ""  # result file prefix ("" = bench-*, memory-*): keeps bench-latest the quick run

    def runs_for(self, case: Case, impl: Impl) -> tuple[int, int]:
        """``(warmup, repeats)`` of (case, impl). A heavy case's non-compiling implementations
        skip the warm-up: the preset ran the smaller shapes first in the same process, so the
        thread pools and libraries are warm, and a big step's buffers are fresh pages on every
        call anyway."""
        if self.heavy(case):
            return (self.warmup if impl.name in COMPILES_FIRST_CALL else 0), 1
        return self.warmup, self.repeats

    def heavy(self, case: Case) -> bool:
        """A case of one timed repeat."""
        return self.heavy_flops is not None and case.flops() > self.heavy_flops

    def adjacent(self, case: Case) -> bool:
        """Whether each row of ``case`` takes its bare GEMMs timed again just before it: a heavy
        case's (one repeat), or all with ``adjacent_gemms``."""
        return bool(case.gemms()) and (self.adjacent_gemms or self.heavy(case))

    @property
    def has_native_target(self) -> bool:
        return NATIVE_TARGET in self.cases

    def skip_reason(self, impl: Impl, case: Case, purpose: str = "time") -> str:
        """Why this preset leaves (impl, case) out to save time; empty when it runs it."""
        if case == NATIVE_TARGET:
            if impl.name in self.target_impls or (purpose == "time" and impl.family == "fastdpo"
                                                  and impl.name != "fastdpo[torch]"):
                return ""
            return f"preset {self.name!r} runs the native target for {list(self.target_impls)}"
        if self.compile_at is not None and impl.name in COMPILING and \
                (case.vocab, case.tokens, case.dtype) not in self.compile_at:
            return (f"preset {self.name!r} compiles only at (V, N, dtype) in "
                    f"{[list(c) for c in self.compile_at]} (compile time)")
        if purpose == "memory" and self.memory_impls is not None and \
                impl.name not in self.memory_impls:
            return f"preset {self.name!r} profiles memory of {list(self.memory_impls)} only"
        return ""


def _sweep(workloads, vocabs, tokens, dtypes, batch=1, hidden=0):
    return tuple(Case(w, v, n, d, batch=batch, hidden=hidden)
                 for w in workloads for d in dtypes for n in tokens for v in vocabs)


def _unique(cases) -> tuple:
    return tuple(dict.fromkeys(cases))


def _gpu(cuda: bool) -> Preset:
    if cuda:
        vocabs, (n_small, n_big), H = VOCABS, (4096, 16384), 4096
        warmup, repeats, budget = 2, 10, 0.3
    else:  # the dry run: every stage of the GPU job at tiny sizes on CPU
        vocabs, (n_small, n_big), H = (512, 1000), (32, 64), 64
        warmup, repeats, budget = 1, 2, 0.2
    headline, other = vocabs[1], tuple(v for v in vocabs if v != vocabs[1])
    bf, fp = "bfloat16", "float32"
    first = (_sweep(("logps_fwd_bwd", "logps_ref"), (headline,), (n_big,), (bf,))
             + _sweep(("linear_fwd_bwd",), (headline,), (n_small,), (bf,), hidden=H)
             + _sweep(("dpo_step",), (headline,), (n_small,), (bf,), batch=4)
             + _sweep(("linear_dpo_step",), (headline,), (n_small,), (bf,), batch=4, hidden=H)
             + _sweep(("logps_fwd_bwd", "logps_ref"), other, (n_big,), (bf,)))
    rest = (_sweep(("linear_fwd_bwd",), other, (n_small,), (bf,), hidden=H)
            + _sweep(("dpo_step",), other, (n_small,), (bf,), batch=4)
            + _sweep(("logps_fwd",), vocabs, (n_big,), (bf,))
            + _sweep(("logps_fwd_bwd", "logps_ref", "logps_fwd"), vocabs, (n_small,), (bf,))
            + _sweep(("logps_fwd_bwd", "logps_ref", "logps_fwd"), vocabs, (n_big, n_small), (fp,)))
    mem = (_sweep(("logps_fwd_bwd",), vocabs, (n_big,), (bf,))
           + _sweep(("linear_fwd_bwd",), vocabs, (n_small,), (bf,), hidden=H))
    compile_at = ((headline, n_big, bf), (headline, n_small, bf))
    # Memory of the compiled peers would mean compiling again: their timed rows carry the peak.
    mem_impls = tuple(i.name for i in all_impls() if i.name not in COMPILING)
    return Preset("gpu", _unique(first + rest), warmup, repeats, budget, mem,
                  compile_at=compile_at, memory_impls=mem_impls,
                  memory_isolated=None if cuda else False)


def lmhead_goals(shapes=LMHEAD_GOAL_SHAPES, row_limit_s: float | None = LMHEAD_ROW_LIMIT_S,
                 dtype: str = "float32", seq: int = LMHEAD_SEQ,
                 heavy_flops: float | None = HEAVY_FLOPS) -> Preset:
    """The fused LM head at ``shapes`` ((N, H, V), run in order): per shape the DPO step, then
    the frozen-head policy pass; the memory profile covers the same cases (module doc)."""
    cases = []
    for n, h, v in shapes:
        b = max(2, 2 * (n // (2 * seq)))  # an even batch: chosen + rejected
        if n % b:
            raise ValueError(f"tokens {n} must be a multiple of the batch {b}")
        cases += [Case("linear_dpo_step", v, n, dtype, batch=b, hidden=h),
                  Case("linear_frozen_fwd_bwd", v, n, dtype, batch=b, hidden=h)]
    return Preset("lmhead-goals", tuple(cases), warmup=1, repeats=5, max_seconds=30.0,
                  memory_cases=tuple(cases), memory_impls=LMHEAD_GOAL_IMPLS,
                  impls=LMHEAD_GOAL_IMPLS, row_limit_s=row_limit_s, heavy_flops=heavy_flops,
                  memory_workers=1, memory_saved=False, files="lmhead-goals",
                  adjacent_gemms=True)


# ``lmhead-busy`` (:mod:`.busy`): the DPO step at the goal shapes, quiet and beside a busy process
# in paired rounds, fastdpo against the peer the goal names (eager) and the fastest (CCE: its
# Triton kernels on a GPU, its torch.compile fallback on a CPU).
LMHEAD_BUSY_IMPLS = ("fastdpo[native]", "eager", "cce", "cce[torch_compile]")
# fastdpo and eager also run with this many torch threads more than the machine's setting.
LMHEAD_BUSY_EXTRA_THREADS = 1


def lmhead_busy_cases(shapes=LMHEAD_GOAL_SHAPES, seq: int = LMHEAD_SEQ) -> tuple:
    """The DPO-step cases of :func:`lmhead_goals` at ``shapes``."""
    return tuple(c for c in lmhead_goals(shapes, seq=seq).cases if c.workload == "linear_dpo_step")


def busy_rounds(case: Case) -> int:
    """Paired rounds for ``case``: 5, or 3 above ``HEAVY_FLOPS`` (each round of the biggest goal
    shape is minutes)."""
    return 3 if case.flops() > HEAVY_FLOPS else 5


PRESETS = ("quick", "full", "gpu", "lmhead-goals")


def preset(name: str, device) -> Preset:
    """The preset ``name`` (one of :data:`PRESETS`) for ``device`` (module doc)."""
    cuda = torch.device(device).type == "cuda"
    if name == "gpu":
        return _gpu(cuda)
    if name == "lmhead-goals":
        return lmhead_goals()
    if name == "quick":
        if cuda:
            cases = (_sweep(("logps_fwd_bwd", "logps_ref"), VOCABS, (8192,), ("bfloat16",))
                     + _sweep(("logps_fwd",), (128256,), (8192,), ("bfloat16",))
                     + _sweep(("dpo_step",), VOCABS, (8192,), ("bfloat16",), batch=4)
                     + _sweep(("linear_fwd_bwd",), (128256,), (8192,), ("bfloat16",), hidden=4096)
                     + _sweep(("linear_dpo_step",), (128256,), (4096,), ("bfloat16",), batch=4,
                              hidden=4096))
            mem = (_sweep(("logps_fwd_bwd",), VOCABS, (8192,), ("bfloat16",))
                   + _sweep(("linear_fwd_bwd",), (32000, 128256, 256000), (8192,),
                            ("bfloat16",), hidden=4096))
            return Preset("quick", (NATIVE_TARGET,) + cases, 3, 20, 5.0, mem)
        # The headline figures only; every sweep is behind --full.
        cases = (_sweep(("logps_ref",), (128256,), (256,), ("float32",))
                 + _sweep(("dpo_step",), (128256,), (256,), ("float32",), batch=2)
                 + _sweep(("linear_fwd_bwd", "linear_frozen_fwd_bwd"), (32000,), (256,),
                          ("float32",), hidden=256)
                 + _sweep(("linear_dpo_step",), (32000,), (256,), ("float32",), batch=2,
                          hidden=256))
        # Fused LM head against materialising the logits, at a Llama-3 vocabulary.
        mem = _sweep(("linear_fwd_bwd",), (128256,), (1024,), ("float32",), hidden=256)
        return Preset("quick", (NATIVE_TARGET,) + cases, 1, 3, 2.0, mem,
                      memory_impls=("fastdpo[native]", "eager"),
                      target_impls=tuple(i for i in NATIVE_TARGET_IMPLS if i != "fastdpo[torch]"))
    if name == "full":
        if cuda:
            toks, dts, H = (4096, 16384), ("bfloat16", "float32"), 4096
        else:
            toks, dts, H = (512, 2048), ("float32", "bfloat16"), 1024
        cases = (_sweep(("logps_fwd_bwd", "logps_fwd", "logps_ref"), VOCABS, toks, dts)
                 + _sweep(("dpo_step",), VOCABS, toks[:1], dts, batch=4)
                 + _sweep(("linear_fwd_bwd", "linear_frozen_fwd_bwd"), VOCABS, toks[:1],
                          dts[:1], hidden=H)
                 + _sweep(("linear_dpo_step",), VOCABS, toks[:1], dts[:1], batch=4, hidden=H))
        mem = (_sweep(("logps_fwd_bwd", "logps_fwd", "logps_ref"), VOCABS, toks[:1], dts)
               + _sweep(("logps_fwd_bwd",), (128256,), (toks[0] // 2,) + toks, dts[:1])
               + _sweep(("dpo_step",), VOCABS, toks[:1], dts[:1], batch=4)
               + _sweep(("linear_fwd_bwd",), VOCABS, toks[:1], dts[:1], hidden=H))
        return Preset("full", (NATIVE_TARGET,) + cases, 2 if not cuda else 5,
                      10 if not cuda else 50, 20.0, mem)
    raise ValueError(f"unknown preset {name!r}")
