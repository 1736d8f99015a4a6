"""Workloads (what one timed step does), their inputs, and the ``--quick`` / ``--full`` presets.

A :class:`Case` fixes shapes and dtype; :func:`build_step` turns (case, implementation) into a
:class:`Step`: ``setup()`` makes the step's inputs (fresh ones when the implementation destroys
them) and ``run(state)`` is the timed or memory-profiled work.

Workloads:

``logps_fwd``        sequence log-probs forward with the autograd graph built (training forward)
``logps_fwd_bwd``    forward + backward to the logits
``logps_ref``        reference-model pass: forward under ``no_grad``
``linear_fwd_bwd``   fused LM head: hidden states + weight -> sequence log-probs, forward + backward
``dpo_step``         policy forward+backward, reference pass, sigmoid DPO loss, from logits
``linear_dpo_step``  the same from hidden states through the LM head (Liger's fused-linear DPO)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .impls import IGNORE_INDEX, Impl, dpo_sigmoid, fastdpo_dpo_loss

WORKLOADS = ("logps_fwd", "logps_fwd_bwd", "logps_ref", "linear_fwd_bwd", "dpo_step",
             "linear_dpo_step")
KIND = {"logps_fwd": "logits", "logps_fwd_bwd": "logits", "logps_ref": "logits",
        "dpo_step": "logits", "linear_fwd_bwd": "linear", "linear_dpo_step": "linear_dpo"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VOCABS = (32000, 128256, 152064, 256000)  # Llama-2, Llama-3, Qwen-2, Gemma


@dataclass(frozen=True)
class Case:
    workload: str
    vocab: int
    tokens: int  # tokens per tensor of logits: batch * seq (per policy/reference for DPO)
    dtype: str = "float32"
    batch: int = 1  # sequences; for DPO steps: chosen + rejected
    hidden: int = 0  # LM-head width for linear workloads
    beta: float = 0.1
    seed: int = 0

    @property
    def seq(self) -> int:
        return self.tokens // self.batch

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kind(self) -> str:
        return KIND[self.workload]

    def logits_bytes(self) -> int:
        """Bytes of one (B, T, V) logits tensor in the case's dtype (the unit of memory reports)."""
        return self.tokens * self.vocab * self.torch_dtype.itemsize

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        h = f" H={self.hidden}" if self.hidden else ""
        return f"{self.workload} V={self.vocab} N={self.tokens} B={self.batch}{h} {self.dtype}"


def make_labels(case: Case, device) -> torch.Tensor:
    """Labels with the first eighth of each sequence ignored (a prompt), the rest uniform ids."""
    g = torch.Generator().manual_seed(case.seed + 1)
    labels = torch.randint(0, case.vocab, (case.batch, case.seq), generator=g)
    labels[:, : case.seq // 8] = IGNORE_INDEX
    return labels.to(device)


def _randn(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    if dtype == torch.float32:
        return torch.randn(shape, generator=g, device=device).mul_(scale)
    # Fill in chunks so the float32 staging copy stays small next to the logits.
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(-1)
    step = 1 << 24
    for i in range(0, flat.numel(), step):
        n = min(step, flat.numel() - i)
        flat[i:i + n] = torch.randn(n, generator=g, device=device).mul_(scale)
    return out


def make_inputs(case: Case, device, *, grad: bool) -> dict:
    """The tensors a case's step reads. Logits are N(0, 2^2): a spread like a trained LM head's."""
    device = torch.device(device)
    dt = case.torch_dtype
    labels = make_labels(case, device)
    if case.kind == "logits":
        shape = (case.batch, case.seq, case.vocab)
        x = _randn(shape, dt, device, case.seed, 2.0).requires_grad_(grad)
        inputs = {"logits": x, "labels": labels}
        if case.workload == "dpo_step":
            inputs["ref_logits"] = _randn(shape, dt, device, case.seed + 7, 2.0)
        return inputs
    H = case.hidden
    hid = _randn((case.batch, case.seq, H), dt, device, case.seed, 1.0).requires_grad_(grad)
    w = _randn((case.vocab, H), dt, device, case.seed + 3, H ** -0.5).requires_grad_(grad)
    inputs = {"hidden": hid, "weight": w, "labels": labels}
    if case.kind == "linear_dpo":
        inputs["ref_hidden"] = _randn((case.batch, case.seq, H), dt, device, case.seed + 5, 1.0)
        inputs["ref_weight"] = _randn((case.vocab, H), dt, device, case.seed + 6, H ** -0.5)
    return inputs


def inputs_bytes(inputs: dict) -> int:
    seen, total = set(), 0
    for t in inputs.values():
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


@dataclass
class Step:
    case: Case
    impl: Impl
    setup: object  # () -> state
    run: object  # (state) -> anything (dropped by the caller)
    grad_inputs: tuple  # names of inputs the step differentiates


def _grads(loss, inputs, names):
    return torch.autograd.grad(loss, [inputs[n] for n in names])


def build_step(case: Case, impl: Impl, device, *,
               fresh_inputs_every_call: bool | None = None) -> Step:
    """The step of ``case`` run by ``impl``. Gradients are returned (not accumulated into ``.grad``)
    so repeats don't pile up buffers and in-place backward hands back the logits' own storage."""
    device = torch.device(device)
    kind = case.kind
    wl = case.workload
    grad = wl != "logps_ref"
    overwrites = impl.destroys_input and kind == "logits" and wl in ("logps_fwd_bwd", "dpo_step")
    fresh = overwrites if fresh_inputs_every_call is None else fresh_inputs_every_call

    if kind == "linear_dpo" and "linear_dpo" not in impl.kinds:
        fn = impl.build("linear", case)  # compose: fused linear logps + a DPO loss
        dpo = (fastdpo_dpo_loss() if impl.family == "fastdpo" else None) or dpo_sigmoid

        def linear_dpo(hidden, weight, ref_hidden, ref_weight, labels, beta):
            pol = fn(hidden, weight, labels)
            with torch.no_grad():
                ref = fn(ref_hidden, ref_weight, labels)
            return dpo(pol, ref, beta)
    elif kind == "linear_dpo":
        linear_dpo = impl.build("linear_dpo", case)
    else:
        fn = impl.build(kind, case)

    cached = {}

    def setup():
        if fresh or not cached:
            cached.clear()
            cached.update(make_inputs(case, device, grad=grad))
        return cached

    if wl == "logps_fwd":
        def run(s):
            return fn(s["logits"], s["labels"])
        names = ()
    elif wl == "logps_fwd_bwd":
        def run(s):
            return _grads(fn(s["logits"], s["labels"]).sum(), s, ("logits",))
        names = ("logits",)
    elif wl == "logps_ref":
        def run(s):
            with torch.no_grad():
                return fn(s["logits"], s["labels"])
        names = ()
    elif wl == "dpo_step":
        dpo = (fastdpo_dpo_loss() if impl.family == "fastdpo" else None) or dpo_sigmoid

        def run(s):
            pol = fn(s["logits"], s["labels"])
            with torch.no_grad():
                ref = fn(s["ref_logits"], s["labels"])
            return _grads(dpo(pol, ref, case.beta), s, ("logits",))
        names = ("logits",)
    elif wl == "linear_fwd_bwd":
        def run(s):
            return _grads(fn(s["hidden"], s["weight"], s["labels"]).sum(), s, ("hidden", "weight"))
        names = ("hidden", "weight")
    elif wl == "linear_dpo_step":
        def run(s):
            loss = linear_dpo(s["hidden"], s["weight"], s["ref_hidden"], s["ref_weight"],
                              s["labels"], case.beta)
            return _grads(loss, s, ("hidden", "weight"))
        names = ("hidden", "weight")
    else:
        raise ValueError(f"unknown workload {wl!r}")
    return Step(case, impl, setup, run, names)


def impl_kind(impl: Impl, case: Case) -> str:
    """Which of ``impl``'s builders runs ``case`` (a fused-linear DPO step composes ``linear``)."""
    if case.kind == "linear_dpo" and "linear_dpo" not in impl.kinds:
        return "linear"
    return case.kind


def supports(impl: Impl, case: Case) -> bool:
    return impl_kind(impl, case) in impl.kinds


def unavailable(impl: Impl, case: Case, device) -> str:
    return impl.unavailable(device, case.torch_dtype, impl_kind(impl, case))


# ---------------------------------------------------------------- presets

# The native backend's CPU target (issue 3): fp32 logits, forward + backward, N = 2048, V = 128256.
NATIVE_TARGET = Case("logps_fwd_bwd", vocab=128256, tokens=2048, dtype="float32", batch=1)
NATIVE_TARGET_IMPLS = ("fastdpo[native]", "fastdpo[torch]", "eager", "torch.compile",
                       "trl.selective_log_softmax")
# Figures the target is judged against (speedup floors, peak-memory ceiling in logits sizes).
NATIVE_TARGET_GOALS = {"speedup_vs": {"eager": 8.0, "torch.compile": 5.0,
                                      "trl.selective_log_softmax": 3.0},
                       "peak_x_logits_max": 1.1}


COMPILING = ("torch.compile", "cce[torch_compile]")


@dataclass(frozen=True)
class Preset:
    name: str
    cases: tuple  # Case, in run order
    warmup: int
    repeats: int
    max_seconds: float  # per (case, impl): stop adding repeats after this much timed work
    memory_cases: tuple  # Case for the memory profiler
    compile_vocabs: tuple | None = None  # logits workloads: torch.compile only at these V
    memory_peer_vocabs: tuple | None = None  # memory: peers but eager only at these V (None: all)
    target_impls: tuple = NATIVE_TARGET_IMPLS

    def skip_reason(self, impl: Impl, case: Case, purpose: str = "time") -> str:
        """Why this preset leaves (impl, case) out to save time; empty when it runs it."""
        if case == NATIVE_TARGET:
            if impl.name in self.target_impls or (purpose == "time" and impl.family == "fastdpo"
                                                  and impl.name != "fastdpo[torch]"):
                return ""
            return f"preset {self.name!r} runs the native target for {list(self.target_impls)}"
        if self.compile_vocabs is not None and impl.name in COMPILING and \
                case.kind == "logits" and case.vocab not in self.compile_vocabs:
            return (f"preset {self.name!r} compiles only at V in {list(self.compile_vocabs)} "
                    "(compile time)")
        if purpose == "memory" and self.memory_peer_vocabs is not None and \
                impl.family == "peer" and impl.name != "eager" and \
                case.vocab not in self.memory_peer_vocabs:
            return (f"preset {self.name!r} profiles peers other than eager only at V in "
                    f"{list(self.memory_peer_vocabs)}")
        return ""


def _sweep(workloads, vocabs, tokens, dtypes, batch=1, hidden=0):
    return tuple(Case(w, v, n, d, batch=batch, hidden=hidden)
                 for w in workloads for d in dtypes for n in tokens for v in vocabs)


def preset(name: str, device) -> Preset:
    """``quick``: a few minutes on 2 CPU cores. ``full``: every vocabulary, more tokens and dtypes.

    Both start with the native CPU target (:data:`NATIVE_TARGET`)."""
    cuda = torch.device(device).type == "cuda"
    if name == "quick":
        if cuda:
            cases = (_sweep(("logps_fwd_bwd", "logps_ref"), VOCABS, (8192,), ("bfloat16",))
                     + _sweep(("logps_fwd",), (128256,), (8192,), ("bfloat16",))
                     + _sweep(("dpo_step",), VOCABS, (8192,), ("bfloat16",), batch=4)
                     + _sweep(("linear_fwd_bwd",), (128256,), (8192,), ("bfloat16",), hidden=4096)
                     + _sweep(("linear_dpo_step",), (128256,), (4096,), ("bfloat16",), batch=4,
                              hidden=4096))
            mem = (_sweep(("logps_fwd_bwd",), VOCABS, (8192,), ("bfloat16",))
                   + _sweep(("logps_fwd_bwd",), (128256,), (2048, 16384), ("bfloat16",))
                   + _sweep(("linear_fwd_bwd",), (32000, 128256, 256000), (8192,),
                            ("bfloat16",), hidden=4096))
            return Preset("quick", (NATIVE_TARGET,) + cases, 3, 20, 5.0, mem)
        cases = (_sweep(("logps_fwd_bwd", "logps_ref"), VOCABS, (256,), ("float32",))
                 + _sweep(("logps_fwd",), (128256,), (256,), ("float32",))
                 + _sweep(("dpo_step",), (32000, 128256), (256,), ("float32",), batch=2)
                 + _sweep(("linear_fwd_bwd",), (32000,), (256,), ("float32",), hidden=256)
                 + _sweep(("linear_dpo_step",), (32000,), (256,), ("float32",), batch=2,
                          hidden=256))
        # the fused LM head at 32k / 128k / 256k against materialising the logits (issue 5)
        mem = (_sweep(("logps_fwd_bwd",), VOCABS, (256,), ("float32",))
               + _sweep(("logps_fwd_bwd",), (128256,), (512,), ("float32",))
               + _sweep(("linear_fwd_bwd",), (32000, 128256, 256000), (1024,), ("float32",),
                        hidden=256))
        return Preset("quick", (NATIVE_TARGET,) + cases, 1, 3, 2.0, mem,
                      compile_vocabs=(128256,),
                      memory_peer_vocabs=(128256,),
                      target_impls=tuple(i for i in NATIVE_TARGET_IMPLS if i != "fastdpo[torch]"))
    if name == "full":
        if cuda:
            toks, dts, H = (4096, 16384), ("bfloat16", "float32"), 4096
        else:
            toks, dts, H = (512, 2048), ("float32", "bfloat16"), 1024
        cases = (_sweep(("logps_fwd_bwd", "logps_fwd", "logps_ref"), VOCABS, toks, dts)
                 + _sweep(("dpo_step",), VOCABS, toks[:1], dts, batch=4)
                 + _sweep(("linear_fwd_bwd",), VOCABS, toks[:1], dts[:1], hidden=H)
                 + _sweep(("linear_dpo_step",), VOCABS, toks[:1], dts[:1], batch=4, hidden=H))
        mem = (_sweep(("logps_fwd_bwd", "logps_fwd", "logps_ref"), VOCABS, toks[:1], dts)
               + _sweep(("logps_fwd_bwd",), (128256,), (toks[0] // 2,) + toks, dts[:1])
               + _sweep(("dpo_step",), VOCABS, toks[:1], dts[:1], batch=4)
               + _sweep(("linear_fwd_bwd",), VOCABS, toks[:1], dts[:1], hidden=H))
        return Preset("full", (NATIVE_TARGET,) + cases, 2 if not cuda else 5,
                      10 if not cuda else 50, 20.0, mem)
    raise ValueError(f"unknown preset {name!r}")
