"""The implementations compared: fastdpo's backends and the peers, each only where it can run.

Every implementation answers ``unavailable(device, dtype, kind)`` with the reason it can't run here
(empty when it can), and builds the functions a workload needs, fresh per case:

* ``seq_logps(logits (B,T,V), labels (B,T)) -> (B,)``: per-sequence log-prob sums, differentiable.
* ``linear_seq_logps(hidden (B,T,H), weight (V,H), labels (B,T)) -> (B,)``: same from the LM head.
* ``linear_dpo(hidden, weight, ref_hidden, ref_weight, labels, beta) -> loss``: whole fused DPO loss
  (only peers that ship one; the others compose ``linear_seq_logps`` and a DPO loss).

Triton-based peers are never timed under ``TRITON_INTERPRET``: the interpreter measures numpy, not
the kernel. Their CPU rows say so.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
NEEDS_GPU = "unavailable on CPU: needs GPU (or TRITON_INTERPRET, which is not timed)"


def _missing(module: str) -> str:
    return "" if importlib.util.find_spec(module) is not None else f"{module} is not installed"


def _compiler_reason(device: torch.device) -> str:
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "cc")):
        return "torch.compile on CPU needs a C++ compiler (none found)"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs triton"
    return ""


@dataclass
class Impl:
    name: str
    family: str  # "fastdpo" or "peer"
    kinds: tuple  # subset of ("logits", "linear", "linear_dpo")
    reason_fn: object  # (device, dtype, kind) -> str
    builders: dict = field(default_factory=dict)  # kind -> factory(case) -> function
    destroys_input: bool = False  # in-place backward: every repeat needs fresh logits
    note: str = ""

    def unavailable(self, device, dtype=torch.float32, kind=None) -> str:
        """Why this can't run on ``device`` for ``dtype`` and workload ``kind`` ("" if it can)."""
        try:
            return self.reason_fn(torch.device(device), dtype, kind or self.kinds[0])
        except Exception as exc:  # noqa: BLE001 - a broken peer is reported, not fatal
            return f"{type(exc).__name__}: {exc}"

    def build(self, kind: str, case):
        return self.builders[kind](case)


# ---------------------------------------------------------------- shared pieces


def masked_sum(tok, labels):
    return (tok * (labels != IGNORE_INDEX)).sum(-1)


def eager_seq_logps(logits, labels):
    """The textbook formulation trainers use: full ``log_softmax`` then ``gather``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return masked_sum(tok, labels)


def eager_linear_seq_logps(hidden, weight, labels):
    return eager_seq_logps(hidden @ weight.t(), labels)


def dpo_sigmoid(pol, ref, beta):
    """Sigmoid DPO from per-sequence log-probs of ``[chosen; rejected]`` stacked on dim 0."""
    n = pol.shape[0] // 2
    margin = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
    return -F.logsigmoid(beta * margin).mean()


def fastdpo_dpo(pol, ref, beta):
    """``fastdpo.dpo_loss`` (sigmoid) on ``[chosen; rejected]`` stacked per-sequence log-probs."""
    from fastdpo import dpo_loss

    n = pol.shape[0] // 2
    loss, _ = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta=beta)
    return loss


# ---------------------------------------------------------------- fastdpo


def _fastdpo_reason(backend: str):
    def reason(device, dtype, kind):
        from fastdpo import backends

        why = backends.device_reason(backend, device)
        if why:
            return why
        if backend == "triton" and device.type == "cpu":
            return "Triton on CPU runs only under TRITON_INTERPRET: not timed"
        try:
            backends.resolve(backend, device, dtype)
        except (RuntimeError, TypeError) as exc:
            return str(exc)
        return ""

    return reason


def _fastdpo_impl(backend: str, inplace: bool) -> Impl:
    def seq(case):
        import fastdpo

        def f(logits, labels):
            return fastdpo.sequence_logps(logits, labels, backend=backend,
                                          inplace_backward=inplace)

        return f

    def lin(case):
        import fastdpo

        def f(hidden, weight, labels):
            return fastdpo.linear_sequence_logps(hidden, weight, labels, backend=backend)

        return f

    def lin_dpo(case):
        import fastdpo

        def f(hidden, weight, ref_hidden, ref_weight, labels, beta):
            # the gradient formed in forward: 3 matmuls for the policy, 1 for the reference
            return fastdpo.linear_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden,
                                           ref_weight=ref_weight, beta=beta, shift=False,
                                           backend=backend)[0]

        return f

    suffix = "" if inplace else ",copy"
    return Impl(
        name=f"fastdpo[{backend}{suffix}]", family="fastdpo",
        kinds=("logits", "linear", "linear_dpo") if inplace else ("logits",),
        reason_fn=_fastdpo_reason(backend),
        builders={"logits": seq, "linear": lin, "linear_dpo": lin_dpo},
        destroys_input=inplace,
        note="inplace_backward=True: the gradient overwrites the logits" if inplace else
        "inplace_backward=False: the gradient gets its own buffer")


def _linear_dpo_variant(backend: str, tag: str, note: str, per_case) -> Impl:
    """``fastdpo[<backend>,<tag>]``: ``linear_dpo_loss`` with the keyword arguments
    ``per_case(case)`` returns, built once per case (so shared by its repeats)."""
    def lin_dpo(case):
        import fastdpo

        kw = per_case(case)

        def f(hidden, weight, ref_hidden, ref_weight, labels, beta):
            return fastdpo.linear_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden,
                                           ref_weight=ref_weight, beta=beta, shift=False,
                                           backend=backend, **kw)[0]

        return f

    return Impl(name=f"fastdpo[{backend},{tag}]", family="fastdpo", kinds=("linear_dpo",),
                reason_fn=_fastdpo_reason(backend), builders={"linear_dpo": lin_dpo}, note=note)


def _lean_options(case) -> dict:
    """At most one planned chunk of logits (``chunk_rows`` = the memory goal's chunk): a pair
    larger than that is streamed (one matmul more, but on the first pair of a native call)."""
    from fastdpo.autograd.linear_loss import plan_rows

    return {"chunk_rows": plan_rows(case.tokens, case.vocab, case.torch_dtype.itemsize, False)}


def _workspace_options(case) -> dict:
    """One :class:`fastdpo.Workspace` for every repeat of the case, as a training loop passes
    the same one each step: the chunk's logits buffer is not fresh pages."""
    import fastdpo

    return {"workspace": fastdpo.Workspace()}


def _fastdpo_lean(backend: str) -> Impl:
    return _linear_dpo_variant(backend, "lean", "chunk_rows = one planned chunk: pairs over it "
                               "streamed (4 policy matmuls; 3 on the first pair natively)",
                               _lean_options)


def _fastdpo_workspace(backend: str) -> Impl:
    return _linear_dpo_variant(backend, "workspace", "workspace=: the chunk buffers kept between "
                               "steps (one chunk's logits held)", _workspace_options)


# ---------------------------------------------------------------- peers


def _eager() -> Impl:
    return Impl("eager", "peer", ("logits", "linear"), lambda d, t, k: "",
                {"logits": lambda c: eager_seq_logps, "linear": lambda c: eager_linear_seq_logps},
                note="log_softmax + gather in fp32, autograd backward")


def _compiled(fn):
    """A fresh ``torch.compile`` of ``fn`` (static shapes: the strongest compiled baseline)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _compile() -> Impl:
    return Impl("torch.compile", "peer", ("logits", "linear"), lambda d, t, k: _compiler_reason(d),
                {"logits": lambda c: _compiled(eager_seq_logps),
                 "linear": lambda c: _compiled(eager_linear_seq_logps)},
                note="torch.compile(dynamic=False) of the eager function; compile time in warm-up")


def _trl_selective() -> Impl:
    def build(case):
        from trl.trainer.utils import selective_log_softmax

        def f(logits, labels):
            mask = labels != IGNORE_INDEX
            return masked_sum(selective_log_softmax(logits, labels.clamp(min=0), row_mask=mask),
                              labels)

        return f

    return Impl("trl.selective_log_softmax", "peer", ("logits",),
                lambda d, t, k: _missing("trl"), {"logits": build},
                note="TRL's Triton kernel on CUDA; its PyTorch fallback (per-row logsumexp) on CPU")


def _trl_chunked() -> Impl:
    def reason(device, dtype, kind):
        why = _missing("trl")
        if why:
            return why
        if not hasattr(importlib.import_module("trl.kernels"), "ChunkedLogProbFunction"):
            return "this trl has no ChunkedLogProbFunction (fused LM head)"
        return ""

    def build(case):
        from trl.kernels import ChunkedLogProbFunction

        def f(hidden, weight, labels):
            B, T, H = hidden.shape
            out = ChunkedLogProbFunction.apply(hidden.reshape(-1, H), weight, None,
                                               labels.clamp(min=0).reshape(-1), 1.0, 32768, None,
                                               1.0, ())
            return masked_sum(out[0].view(B, T), labels)

        return f

    return Impl("trl.chunked_logprob", "peer", ("linear",), reason, {"linear": build},
                note="TRL's fused LM head (cuBLAS tiles + Triton fold on CUDA, torch tiles on CPU)")


def _gpu_triton_peer(module: str):
    def reason(device, dtype, kind):
        why = _missing(module)
        if why:
            return why
        return NEEDS_GPU if device.type == "cpu" else ""

    return reason


def _liger_ce() -> Impl:
    def build(case):
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

        def f(logits, labels):
            B, T, V = logits.shape
            loss = LigerCrossEntropyFunction.apply(logits.reshape(-1, V), labels.reshape(-1), None,
                                                   IGNORE_INDEX, 0.0, 0.0, "none", None, False,
                                                   False, False)[0]
            return -loss.view(B, T).sum(-1)  # per-token loss is -logp, 0 where ignored

        return f

    return Impl("liger.cross_entropy", "peer", ("logits",), _gpu_triton_peer("liger_kernel"),
                {"logits": build}, note="reduction='none'; per-token loss = -logp")


def _liger_flce() -> Impl:
    def build(case):
        from liger_kernel.ops.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyFunction,
        )

        def f(hidden, weight, labels):
            B, T, H = hidden.shape
            loss = LigerFusedLinearCrossEntropyFunction.apply(hidden.reshape(-1, H), weight,
                                                              labels.reshape(-1), None, None,
                                                              IGNORE_INDEX, 0.0, 0.0, "none")[0]
            return -loss.view(B, T).sum(-1)

        return f

    return Impl("liger.fused_linear_cross_entropy", "peer", ("linear",),
                _gpu_triton_peer("liger_kernel"), {"linear": build}, note="reduction='none'")


def _liger_dpo() -> Impl:
    def reason(device, dtype, kind):
        return _missing("liger_kernel") or _compiler_reason(device)

    def build(case):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        torch._dynamo.reset()
        mod = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=case.beta,
                                      use_ref_model=True)

        def f(hidden, weight, ref_hidden, ref_weight, labels, beta):
            out = mod(weight, hidden, labels, None, ref_hidden, ref_weight, None)
            return out[0] if isinstance(out, tuple) else out

        return f

    return Impl("liger.fused_linear_dpo", "peer", ("linear_dpo",), reason, {"linear_dpo": build},
                note="Liger's chunked fused-linear DPO (PyTorch + torch.compile, runs on CPU)")


def _cce(impl: str) -> Impl:
    def reason(device, dtype, kind):
        why = _missing("cut_cross_entropy")
        if why:
            return why
        if impl == "cce" and device.type == "cpu":
            return ("unavailable on CPU: CCE's 'cce' implementation is Triton kernels; needs GPU "
                    "(or TRITON_INTERPRET, which is not timed)")
        return _compiler_reason(device) if impl == "torch_compile" else ""

    def build(case):
        from cut_cross_entropy import linear_cross_entropy

        if impl == "torch_compile":
            torch._dynamo.reset()

        def f(hidden, weight, labels):
            loss = linear_cross_entropy(hidden, weight, labels, reduction="none", impl=impl)
            return -loss.float().sum(-1)

        return f

    name = "cce" if impl == "cce" else "cce[torch_compile]"
    note = ("Cut Cross-Entropy Triton kernels" if impl == "cce" else
            "CCE's fallback: torch.compile of matmul + cross_entropy (materialises the logits)")
    return Impl(name, "peer", ("linear",), reason, {"linear": build}, note=note)


def _flash_attn_ce() -> Impl:
    def build(case):
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

        def f(logits, labels):
            B, T, V = logits.shape
            loss = cross_entropy_loss(logits.reshape(-1, V), labels.reshape(-1))
            loss = loss[0] if isinstance(loss, tuple) else loss
            return -loss.view(B, T).sum(-1)

        return f

    return Impl("flash_attn.cross_entropy", "peer", ("logits",), _gpu_triton_peer("flash_attn"),
                {"logits": build}, note="flash-attn's Triton cross entropy, per-token loss")


def all_impls() -> list[Impl]:
    """Every implementation, fastdpo's first, in report order."""
    return [
        _fastdpo_impl("native", True), _fastdpo_lean("native"), _fastdpo_workspace("native"),
        _fastdpo_impl("triton", True),
        _fastdpo_impl("torch", True),
        _eager(), _compile(), _trl_selective(), _trl_chunked(), _liger_ce(), _liger_flce(),
        _liger_dpo(), _cce("cce"), _cce("torch_compile"), _flash_attn_ce(),
    ]


def split_names(text: str) -> list[str]:
    """A comma list of implementation names; a comma inside brackets (``fastdpo[native,lean]``)
    belongs to the name."""
    names, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            names.append(cur.strip())
            cur = ""
        else:
            cur += ch
    names.append(cur.strip())
    return [n for n in names if n]


def by_name(names=None) -> list[Impl]:
    impls = all_impls()
    if not names:
        return impls
    known = {i.name: i for i in impls}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown implementations {unknown}; known: {sorted(known)}")
    return [known[n] for n in names]
