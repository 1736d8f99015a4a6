"""Workloads (what one timed step does) and their inputs; the presets are in :mod:`.presets`.

A :class:`Case` fixes shapes and dtype; :func:`build_step` turns (case, implementation) into a
:class:`Step`: ``setup()`` makes the step's inputs (fresh ones when the implementation destroys
them) and ``run(state)`` is the timed or memory-profiled work.

Workloads:

``logps_fwd``        sequence log-probs forward with the autograd graph built (training forward)
``logps_fwd_bwd``    forward + backward to the logits
``logps_ref``        reference-model pass: forward under ``no_grad``
``linear_fwd_bwd``   fused LM head: hidden states + weight -> sequence log-probs, forward + backward
``linear_frozen_fwd_bwd``  the same with a frozen head (``weight.requires_grad=False``): the
                     policy pass of a frozen-LM-head setup, gradient to the hidden states only
``dpo_step``         policy forward+backward, reference pass, sigmoid DPO loss, from logits
``linear_dpo_step``  the same from hidden states through the LM head (Liger's fused-linear DPO)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .impls import IGNORE_INDEX, Impl, dpo_sigmoid, fastdpo_dpo

WORKLOADS = ("logps_fwd", "logps_fwd_bwd", "logps_ref", "linear_fwd_bwd", "dpo_step",
             "linear_dpo_step", "linear_frozen_fwd_bwd")
KIND = {"logps_fwd": "logits", "logps_fwd_bwd": "logits", "logps_ref": "logits",
        "dpo_step": "logits", "linear_fwd_bwd": "linear", "linear_dpo_step": "linear_dpo",
        "linear_frozen_fwd_bwd": "linear"}
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

    def logits_passes(self) -> int:
        """Logits-sized passes over memory the step cannot avoid: the forward reads the logits
        once; the backward reads them again and writes the gradient; a DPO step adds the
        reference logits, read once."""
        return {"logps_fwd": 1, "logps_ref": 1, "logps_fwd_bwd": 3, "dpo_step": 4}.get(
            self.workload, 0)

    @property
    def frozen_head(self) -> bool:
        """The LM-head weight needs no gradient (only the hidden states get one)."""
        return self.workload == "linear_frozen_fwd_bwd"

    def gemms(self) -> tuple:
        """``(M, N, K)`` of the matrix products a fused LM-head step stands for, counted without
        recomputation: logits ``hidden @ weight.T``, then ``d_hidden = g @ weight`` and (unless the
        head is frozen) ``d_weight = g.T @ hidden``; the reference pass of a DPO step adds one
        more forward product. So 3 for ``linear_fwd_bwd``, 2 frozen, 4 for a DPO step."""
        if self.kind not in ("linear", "linear_dpo"):
            return ()
        N, V, H = self.tokens, self.vocab, self.hidden
        if self.frozen_head:
            return ((N, V, H), (N, H, V))
        step = ((N, V, H), (N, H, V), (V, H, N))
        return step + ((N, V, H),) if self.kind == "linear_dpo" else step

    def flops(self) -> int:
        return sum(2 * m * n * k for m, n, k in self.gemms())

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
    w = _randn((case.vocab, H), dt, device, case.seed + 3, H ** -0.5)
    w.requires_grad_(grad and not case.frozen_head)
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
        dpo = fastdpo_dpo if impl.family == "fastdpo" else dpo_sigmoid

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
        dpo = fastdpo_dpo if impl.family == "fastdpo" else dpo_sigmoid

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
    elif wl == "linear_frozen_fwd_bwd":
        def run(s):
            return _grads(fn(s["hidden"], s["weight"], s["labels"]).sum(), s, ("hidden",))
        names = ("hidden",)
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
