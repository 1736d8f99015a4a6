"""Global-memory traffic of Triton kernels, counted under ``TRITON_INTERPRET=1`` (no GPU).

The interpreter executes every ``tl.load`` / ``tl.store`` (plain, masked, descriptor, atomic)
through ``create_masked_load`` / ``create_masked_store`` of one ``InterpreterBuilder`` instance,
with numpy arrays of addresses and masks. :class:`TrafficCounter` wraps those two methods (and
``create_atomic_rmw``) on that instance for the duration of a ``with`` block (nothing is patched
at import), counts the bytes of the masked-in elements, and keeps the addresses so the traffic
can be split by tensor afterwards. It also records each kernel launch (function, arguments,
meta-parameters) for ahead-of-time compilation of the same specialisations (:mod:`.static`).

The minimum a log-prob kernel must move: forward reads each non-ignored row of logits once and the
per-token tensors (labels, outputs) once; backward also writes the gradient once (every row: ignored
rows get zeros). ``ratio = counted bytes / minimum``; re-reads and extra passes show up as > 1.

The kernels must have been defined with the interpreter on, i.e. ``TRITON_INTERPRET=1`` set before
Triton-decorated modules were imported; :func:`run_isolated` starts a fresh interpreter that way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Access:
    kind: str  # "load" or "store"
    addrs: np.ndarray  # byte addresses of masked-in elements
    elem: int  # bytes per element


@dataclass
class Launch:
    module: str
    qualname: str
    params: dict  # name -> {"type": str, "spec": str|None} or {"constexpr": value}
    options: dict  # num_warps, num_stages, ...
    grid: tuple


@dataclass
class TrafficCounter:
    accesses: list = field(default_factory=list)
    launches: list = field(default_factory=list)

    def __enter__(self):
        from triton.runtime import interpreter as interp

        self._interp = interp
        b = interp.interpreter_builder
        orig_load, orig_store = b.create_masked_load, b.create_masked_store
        counter = self

        # Only the leading (pointers, mask) arguments are read: the cache/eviction arguments
        # after them differ between Triton releases (3.6 has two, 3.9 one) and pass through.
        def create_masked_load(ptrs, mask, *rest):
            counter._record("load", ptrs, mask)
            return orig_load(ptrs, mask, *rest)

        def create_masked_store(ptrs, value, mask, *rest):
            counter._record("store", ptrs, mask)
            return orig_store(ptrs, value, mask, *rest)

        orig_rmw = b.create_atomic_rmw

        def create_atomic_rmw(rmw_op, ptr, val, mask, *rest):
            counter._record("load", ptr, mask)
            counter._record("store", ptr, mask)
            return orig_rmw(rmw_op, ptr, val, mask, *rest)

        b.create_masked_load = create_masked_load
        b.create_masked_store = create_masked_store
        b.create_atomic_rmw = create_atomic_rmw
        self._orig_run = interp.InterpretedFunction.run

        def run(fn_self, *args, grid, warmup, **kwargs):
            if not warmup:
                counter._record_launch(fn_self, args, kwargs, grid)
            return counter._orig_run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        interp.InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        b = self._interp.interpreter_builder
        for name in ("create_masked_load", "create_masked_store", "create_atomic_rmw"):
            b.__dict__.pop(name, None)  # back to the class methods
        self._interp.InterpretedFunction.run = self._orig_run
        return False

    def _record(self, kind, ptrs, mask):
        addrs = np.asarray(ptrs.data)
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
        elem = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        self.accesses.append(Access(kind, addrs[m].astype(np.uint64).ravel(), elem))

    def _record_launch(self, fn_self, args, kwargs, grid):
        import inspect

        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        fn = fn_self.fn
        sig = inspect.signature(fn)
        params = {}
        meta = {}
        bound = dict(zip(fn_self.arg_names, args))
        for k, v in kwargs.items():
            (bound if k in sig.parameters else meta)[k] = v
        for name, p in sig.parameters.items():
            if name not in bound:
                if p.default is inspect.Parameter.empty:
                    continue
                bound[name] = p.default
            v = bound[name]
            ann = str(p.annotation)
            if "constexpr" in ann:
                params[name] = {"constexpr": _jsonable(v)}
                continue
            try:
                ty, spec = native_specialize_impl(BaseBackend, v, False, True, True)
            except Exception:  # noqa: BLE001 - unusual argument: keep the launch, mark it
                ty, spec = f"unknown:{type(v).__name__}", None
            if ty == "constexpr":
                params[name] = {"constexpr": _jsonable(spec)}
            else:
                params[name] = {"type": ty, "spec": spec}
        g = grid(bound) if callable(grid) else grid
        self.launches.append(Launch(fn.__module__, fn.__qualname__, params,
                                    {k: _jsonable(v) for k, v in meta.items()},
                                    tuple(int(x) for x in g)))

    # ------------------------------------------------------------ attribution

    def by_region(self, regions: dict) -> dict:
        """Bytes per named tensor: ``regions`` maps name -> tensor; the rest goes to "other"."""
        spans = []
        for name, t in regions.items():
            if t is None or t.numel() == 0:
                continue
            s = t.untyped_storage()
            spans.append((s.data_ptr(), s.data_ptr() + s.nbytes(), name))
        spans.sort()
        starts = np.array([s for s, _, _ in spans], dtype=np.uint64)
        out = defaultdict(lambda: {"load_bytes": 0, "store_bytes": 0, "_addrs": []})
        for a in self.accesses:
            if a.addrs.size == 0:
                continue
            idx = np.searchsorted(starts, a.addrs, side="right").astype(np.int64) - 1
            for i in np.unique(idx):
                sel = a.addrs[idx == i]
                name = "other"
                if i >= 0:
                    s0, s1, nm = spans[i]
                    inside = sel < s1
                    if not inside.all():
                        rest = sel[~inside]
                        o = out["other"]
                        o[f"{a.kind}_bytes"] += rest.size * a.elem
                        o["_addrs"].append((a.kind, rest, a.elem))
                        sel = sel[inside]
                    name = nm
                r = out[name]
                r[f"{a.kind}_bytes"] += sel.size * a.elem
                r["_addrs"].append((a.kind, sel, a.elem))
        res = {}
        for name, r in out.items():
            if r["load_bytes"] == r["store_bytes"] == 0:
                continue
            uniq = {}
            for kind in ("load", "store"):
                by_elem = defaultdict(list)
                for k, x, e in r["_addrs"]:
                    if k == kind:
                        by_elem[e].append(x)
                uniq[kind] = sum(np.unique(np.concatenate(xs)).size * e
                                 for e, xs in by_elem.items())
            res[name] = {"load_bytes": r["load_bytes"], "store_bytes": r["store_bytes"],
                         "unique_load_bytes": uniq["load"], "unique_store_bytes": uniq["store"]}
        return res

    def totals(self) -> dict:
        ld = sum(a.addrs.size * a.elem for a in self.accesses if a.kind == "load")
        st = sum(a.addrs.size * a.elem for a in self.accesses if a.kind == "store")
        return {"load_bytes": ld, "store_bytes": st, "bytes": ld + st}


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, torch.dtype):
        return str(v)
    return repr(v)


# ---------------------------------------------------------------- cases


@dataclass
class TrafficCase:
    impl: str  # "fastdpo[triton]", "trl.logprob_entropy", "liger.cross_entropy"
    op: str  # "fwd", "bwd", "fwd_bwd", "bwd_inplace"
    B: int
    T: int
    V: int
    dtype: str
    config: str = "gpu"  # "gpu": the kernels' GPU launch configuration; "default": as launched


def _inputs(c: TrafficCase, ignored_rows: int = 0):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(c.B, c.T, c.V, generator=g) * 2).to(DTYPES[c.dtype])
    lab = torch.randint(0, c.V, (c.B, c.T), generator=g)
    if ignored_rows:
        lab.view(-1)[:ignored_rows] = -100
    return x, lab


def _fastdpo_launch_kw(op: str, V: int, dtype, config: str) -> dict:
    """The GPU launch configuration's tile and warps (``config == "gpu"``), passed to the
    launcher as overrides of the interpreter's small tiles."""
    from fastdpo.triton import logps as tl_logps

    if config != "gpu":
        return {}
    cfg = tl_logps.launch_config(V, dtype, op, interpreted=False)
    return {"block_v": cfg["BLOCK_V"], "num_warps": cfg["num_warps"]}


def _minimum(small: dict, grad_rows_written: int, active_rows: int, row_bytes: int) -> int:
    """Logits read once per active row, gradient written once per row, small tensors once."""
    need = active_rows * row_bytes + grad_rows_written * row_bytes
    return need + sum(t.numel() * t.element_size() for t in small.values() if t is not None)


def run_case(c: TrafficCase, ignored_rows: int = 0) -> dict:
    """Count the traffic of one case (the caller must be running under the interpreter)."""
    x, lab = _inputs(c, ignored_rows)
    N = c.B * c.T
    row_bytes = c.V * x.element_size()
    active = int((lab != -100).sum())
    counter = TrafficCounter()
    res = {"impl": c.impl, "op": c.op, "B": c.B, "T": c.T, "V": c.V, "dtype": c.dtype,
           "tokens": N, "ignored_rows": ignored_rows, "config": c.config}
    if c.impl == "fastdpo[triton]":
        from fastdpo.triton import logps as tl_logps

        if c.op == "fwd":
            kw = _fastdpo_launch_kw("fwd", c.V, x.dtype, c.config)
            with counter:
                logp, mx, ls, _ = tl_logps.logps_fwd(x, lab, -100, 1.0, 0, c.V, False, **kw)
            regions = {"logits": x, "labels": lab, "logp": logp, "row_max": mx, "log_sum": ls}
            small = {"labels": lab, "logp": logp, "row_max": mx, "log_sum": ls}
            grad_rows = 0
        else:
            _, mx, ls, _ = tl_logps.logps_fwd(x, lab, -100, 1.0, 0, c.V, False)
            g = torch.ones(c.B, c.T)
            out = x if c.op == "bwd_inplace" else torch.empty_like(x)
            kw = _fastdpo_launch_kw("bwd", c.V, x.dtype, c.config)
            with counter:
                tl_logps.logps_bwd(g, None, x, lab, mx, ls, None, -100, 1.0, 0, c.V, out, **kw)
            regions = {"logits": x, "grad_logits": out, "labels": lab, "row_max": mx,
                       "log_sum": ls, "grad_logp": g}
            if c.op == "bwd_inplace":
                regions.pop("grad_logits")
            small = {"labels": lab, "row_max": mx, "log_sum": ls, "grad_logp": g}
            grad_rows = N
        res["launch_config"] = kw or "as launched"
    elif c.impl == "trl.logprob_entropy":
        from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy as trl_fn

        xg = x.clone().requires_grad_(c.op != "fwd")
        idx = lab.clamp(min=0)
        mask = lab != -100
        if c.op == "fwd":
            with counter:
                lp, ent = trl_fn(xg, idx, row_mask=mask if ignored_rows else None)
            regions = {"logits": xg, "labels": idx, "mask": mask, "logp": lp, "entropy": ent}
            small = {"labels": idx, "logp": lp, "entropy": ent}
            grad_rows = 0
        else:
            lp, ent = trl_fn(xg, idx, row_mask=mask if ignored_rows else None)
            with counter:
                (gx,) = torch.autograd.grad(lp.sum(), xg)
            regions = {"logits": xg, "grad_logits": gx, "labels": idx, "mask": mask}
            small = {"labels": idx}
            grad_rows = N
        res["launch_config"] = "as launched (TRL's fixed BLOCK_SIZE)"
    elif c.impl == "liger.cross_entropy":
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

        xg = x.clone().view(N, c.V).requires_grad_(True)
        flat = lab.view(-1)
        # Liger computes the gradient inside its forward kernel (written over the logits), so its
        # forward is the fused forward+backward of the others; backward rescales it.
        with counter:
            loss = LigerCrossEntropyFunction.apply(xg, flat, None, -100, 0.0, 0.0, "none", None,
                                                   False, False, False)[0]
            if c.op == "fwd_bwd":
                torch.autograd.grad(loss.sum(), xg)
        regions = {"logits": xg, "labels": flat, "loss": loss}
        small = {"labels": flat, "loss": loss}
        grad_rows = N  # the gradient has to be written once
        res["launch_config"] = "as launched (Liger's own block size and warps)"
    elif c.impl == "fastdpo[triton].linear":
        return _run_linear(c, counter, res)
    else:
        raise ValueError(f"unknown traffic implementation {c.impl!r}")
    parts = counter.by_region(regions)
    tot = counter.totals()
    minimum = _minimum(small, grad_rows, active, row_bytes)
    res.update(total_bytes=tot["bytes"], load_bytes=tot["load_bytes"],
               store_bytes=tot["store_bytes"], minimum_bytes=minimum,
               ratio=tot["bytes"] / minimum, bytes_per_token=tot["bytes"] / N,
               minimum_bytes_per_token=minimum / N, by_tensor=parts,
               logits_reads_per_active_row=(parts.get("logits", {}).get("load_bytes", 0)
                                            / max(active * row_bytes, 1)),
               launches=[{"kernel": f"{ln.module}.{ln.qualname}", "grid": ln.grid,
                          "options": ln.options,
                          "constexprs": {k: v["constexpr"] for k, v in ln.params.items()
                                         if "constexpr" in v}}
                         for ln in counter.launches])
    res["_launches"] = [ln.__dict__ for ln in counter.launches]
    return res


def _run_linear(c: TrafficCase, counter: TrafficCounter, res: dict) -> dict:
    """Fused LM head (informational): Triton kernels only, the backward's matmuls are torch ops.
    ``T`` is the hidden width here. The minimum (hidden, weight, labels and outputs once) is a
    lower bound a tiled GEMM does not reach: the weight is re-read once per token tile."""
    from fastdpo.triton import linear as tl_linear

    N, H, V = c.B, c.T, c.V
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[c.dtype]
    h = torch.randn(N, H, generator=g).to(dt)
    w = (torch.randn(V, H, generator=g) * H ** -0.5).to(dt)
    lab = torch.randint(0, V, (N,), generator=g)
    if c.op == "fwd":
        with counter:
            logp, mx, ls, _ = tl_linear.linear_logps_fwd(h, w, None, lab, -100, 1.0, 1.0, 0.0, 0,
                                                         V, False)
        small = {"labels": lab, "logp": logp, "row_max": mx, "log_sum": ls}
    else:
        _, mx, ls, _ = tl_linear.linear_logps_fwd(h, w, None, lab, -100, 1.0, 1.0, 0.0, 0, V,
                                                  False)
        gl = torch.ones(N)
        with counter:
            tl_linear.linear_logps_bwd(gl, None, h, w, None, lab, mx, ls, None, -100, 1.0, 1.0,
                                       0.0, 0, V, True, True, False)
        small = {"labels": lab, "row_max": mx, "log_sum": ls, "grad_logp": gl}
    tot = counter.totals()
    minimum = (h.numel() + w.numel()) * h.element_size() + sum(
        t.numel() * t.element_size() for t in small.values())
    res.update(total_bytes=tot["bytes"], load_bytes=tot["load_bytes"],
               store_bytes=tot["store_bytes"], minimum_bytes=minimum, ratio=tot["bytes"] / minimum,
               note="Triton kernels only (matmuls of the backward are not counted); minimum "
                    "reads hidden and weight once, which tiling does not",
               by_tensor=counter.by_region({"hidden": h, "weight": w, "labels": lab, **small}),
               launch_config="as launched under the interpreter (small tiles)",
               launches=[{"kernel": f"{ln.module}.{ln.qualname}", "grid": ln.grid}
                         for ln in counter.launches])
    res["_launches"] = [ln.__dict__ for ln in counter.launches]
    return res


def default_cases(vocabs=(5003,), dtypes=("float32", "bfloat16"), B=2, T=3, peers=True):
    cases = []
    for V in vocabs:
        for dt in dtypes:
            for op in ("fwd", "bwd", "bwd_inplace"):
                cases.append(TrafficCase("fastdpo[triton]", op, B, T, V, dt))
            if peers:
                cases.append(TrafficCase("trl.logprob_entropy", "fwd", B, T, V, dt, "default"))
                cases.append(TrafficCase("trl.logprob_entropy", "bwd", B, T, V, dt, "default"))
                cases.append(TrafficCase("liger.cross_entropy", "fwd_bwd", B, T, V, dt, "default"))
    return cases


def run_cases(cases, ignored_rows: int = 0) -> list[dict]:
    """Run ``cases`` here (requires the interpreter); a case that fails is reported, not raised."""
    out = []
    for c in cases:
        try:
            with np.errstate(all="ignore"):
                out.append(run_case(c, ignored_rows))
        except Exception as exc:  # noqa: BLE001 - peers may not run under the interpreter
            out.append({**c.__dict__, "error": f"{type(exc).__name__}: {exc}"[:400]})
    return out


def interpreted_here() -> bool:
    """True when this process's Triton kernels were defined under the interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction

        from fastdpo.triton import logps as tl_logps

        return isinstance(tl_logps._logps_fwd_kernel, InterpretedFunction)
    except Exception:  # noqa: BLE001
        return False


def run_isolated(cases, ignored_rows: int = 0, timeout: float = 600) -> list[dict]:
    """Run ``cases`` in a fresh interpreter with ``TRITON_INTERPRET=1``."""
    spec = json.dumps({"cases": [c.__dict__ for c in cases], "ignored_rows": ignored_rows})
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-m", "fastdpo.bench.inspect.traffic", spec],
                       capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("[")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"traffic child failed ({p.returncode}): {p.stderr.strip()[-800:]}")
    return json.loads(lines[-1])


def measure(cases, ignored_rows: int = 0) -> list[dict]:
    if interpreted_here():
        return run_cases(cases, ignored_rows)
    return run_isolated(cases, ignored_rows)


def main(argv) -> int:
    spec = json.loads(argv[0])
    cases = [TrafficCase(**c) for c in spec["cases"]]
    print(json.dumps(run_cases(cases, spec.get("ignored_rows", 0)), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
