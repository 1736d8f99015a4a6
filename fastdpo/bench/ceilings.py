"""What the hardware can do, measured in the same run, and each row's place against it.

* Copy bandwidth: a device-to-device copy of a buffer far larger than the last-level cache,
  counting bytes read plus bytes written. A logits-path step must read (and for the backward,
  write) at least :meth:`Case.logits_passes` logits-sized tensors; that over its median time,
  divided by the copy bandwidth, is its ``copy_fraction``.
* Bare matrix products: the products a fused LM-head step stands for (:meth:`Case.gemms`: 3 for
  forward + backward, 2 with a frozen head, 4 for a DPO step), each timed with ``torch.mm`` into a
  preallocated output (cuBLAS on CUDA, the CPU BLAS on CPU) on the same shapes and dtype;
  ``gemm_s`` is the sum of their medians and ``x_gemm = median / gemm_s``. A heavy row (one
  timed repeat), and every row of a preset with ``adjacent_gemms`` (``lmhead-goals``), is set
  against its products timed again just before it (``gemm_basis`` ``"adjacent"``, the run's
  own figure kept as ``gemm_run_s``): over a long run this machine's speed drifts by 10-20%, as
  much as the ratio measures.

Also the crude cost model behind the up-front time estimates of :mod:`.progress`.
"""

from __future__ import annotations

import torch

from .timing import measure
from .workloads import Case, _randn

COPY_BYTES = {"cuda": 2 << 30, "cpu": 64 << 20}


def copy_bandwidth(device, nbytes: int | None = None, repeats: int = 20) -> dict:
    """Median device-to-device copy bandwidth (read + write bytes per second)."""
    device = torch.device(device)
    n = nbytes or COPY_BYTES.get(device.type, 64 << 20)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda _: dst.copy_(src), device=device, warmup=3, repeats=repeats)
    return {"bytes": n, "median_s": t.median_s, "gbps": 2 * n / t.median_s / 1e9,
            "iqr_rel": t.iqr_rel, "repeats": t.repeats}


# A bare product whose first (warm-up) call takes longer than this is timed once more and no
# further: on 2 CPU cores one (4096, 1024) x (1024, 128256) product is ~1 TFLOP, ~10 s.
HEAVY_GEMM_S = 2.0
# Timed calls of one product stop once this much was spent (at least 3 kept).
GEMM_MAX_S = 5.0


def product_time(shape, dtype, device, repeats: int = 10) -> dict:
    """Median time of one bare product ``(M, K) @ (K, N)`` into a preallocated output. The first
    call is the warm-up; when it took more than ``HEAVY_GEMM_S`` a single timed call follows,
    else up to ``repeats`` (stopping after ``GEMM_MAX_S`` of timed calls)."""
    device = torch.device(device)
    m, n, k = shape
    a = _randn((m, k), dtype, device, 11)
    b = _randn((k, n), dtype, device, 23)
    out = torch.empty((m, n), dtype=dtype, device=device)

    def run(_):
        torch.mm(a, b, out=out)

    first = measure(run, device=device, warmup=0, repeats=1)
    if first.median_s > HEAVY_GEMM_S:
        t = measure(run, device=device, warmup=0, repeats=1)
    else:
        t = measure(run, device=device, warmup=1, repeats=repeats, max_seconds=GEMM_MAX_S)
    return {"median_s": t.median_s, "iqr_rel": t.iqr_rel, "repeats": t.repeats}


def gemm_time(case: Case, device, repeats: int = 10, cache: dict | None = None) -> dict:
    """Time of the bare products of ``case.gemms()`` in the case's dtype: each distinct shape
    timed on its own (:func:`product_time`, ``cache`` keyed by shape and dtype: a DPO step's
    second forward product, a frozen head's two products reuse the same measurements), the
    case's figure the sum of its products' medians."""
    cache = {} if cache is None else cache
    dt = case.torch_dtype
    total, parts = 0.0, []
    for shape in case.gemms():
        key = (tuple(shape), case.dtype)
        if key not in cache:
            cache[key] = product_time(shape, dt, device, repeats)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
        total += cache[key]["median_s"]
        parts.append({"shape": list(shape), **cache[key]})
    f = case.flops()
    return {"median_s": total, "flops": f, "tflops": f / total / 1e12, "gflops": f / total / 1e9,
            "n_gemms": len(parts), "products": parts}


class Ceilings:
    """The copy bandwidth of this run, and bare-product times per LM-head case (cached)."""

    def __init__(self, device, log=print, copy_bytes: int | None = None,
                 gemm_repeats: int = 10):
        self.device = torch.device(device)
        self.copy = copy_bandwidth(self.device, copy_bytes)
        self.gemm: dict[tuple, dict] = {}
        self.products: dict[tuple, dict] = {}
        self.gemm_repeats = gemm_repeats
        if log:
            log(f"same-run ceiling: device-to-device copy {self.copy['gbps']:.1f} GB/s "
                f"({self.copy['bytes'] / 2**20:.0f} MiB, read + write)")

    def gemm_for(self, case: Case) -> dict:
        key = (case.gemms(), case.dtype)
        if key not in self.gemm:
            self.gemm[key] = self._timed(case, self.products)
        return self.gemm[key]

    def adjacent(self, case: Case) -> dict:
        """The case's bare products timed again now, none from the cache (module doc)."""
        return self._timed(case, {})

    def _timed(self, case: Case, cache: dict) -> dict:
        """:func:`gemm_time`, or ``{"error": ...}``: the row still stands without its ratio."""
        try:
            return gemm_time(case, self.device, self.gemm_repeats, cache)
        except Exception as exc:  # noqa: BLE001 - one failing product doesn't stop the sweep
            return {"error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def relate(self, case: Case, median_s: float, adjacent: dict | None = None) -> dict:
        """The row's ratios; ``adjacent`` (:meth:`adjacent`, timed beside the row) is its GEMM
        basis when it has a time, else the run's figure."""
        out = {}
        if case.kind == "logits" and case.logits_passes():
            gbps = case.logits_passes() * case.logits_bytes() / median_s / 1e9
            out.update(copy_gbps=self.copy["gbps"], copy_fraction=gbps / self.copy["gbps"])
        if case.gemms():
            run = self.gemm_for(case)
            near = adjacent is not None and "median_s" in adjacent
            g = adjacent if near else run
            if "median_s" in g:
                out.update(gemm_s=g["median_s"], gemm_tflops=g["tflops"],
                           gemm_gflops=g["gflops"], x_gemm=median_s / g["median_s"],
                           gemm_basis="adjacent" if near else "run")
            if near and "median_s" in run:
                out["gemm_run_s"] = run["median_s"]
        return out

    def to_dict(self) -> dict:
        return {"copy": self.copy,
                "gemm": [{"shapes": k[0], "dtype": k[1], **v} for k, v in self.gemm.items()]}


def flop_rate(gflops: float) -> str:
    if gflops < 10:
        return f"{gflops:.1f} GFLOP/s"
    return f"{gflops:.0f} GFLOP/s" if gflops < 1000 else f"{gflops / 1000:.0f} TFLOP/s"


def describe(row: dict) -> str:
    """Short suffix for a progress line: the row against the ceilings."""
    parts = []
    if row.get("copy_fraction") is not None:
        parts.append(f"{row['achieved_gbps']:.0f} GB/s = {row['copy_fraction'] * 100:.0f}% copy")
    if row.get("x_gemm") is not None:
        parts.append(f"{row['x_gemm']:.2f}x {row['n_gemms']} bare GEMMs, "
                     f"{flop_rate(row['gflops'])}")
    return ("  " + "; ".join(parts)) if parts else ""


def goals(rows: list[dict], goal: dict) -> list[dict]:
    """Each fastdpo row the GPU goals speak of, with whether it met its goal."""
    out = []
    for r in rows:
        if r.get("status") != "ok" or r.get("family") != "fastdpo":
            continue
        if r.get("copy_fraction") is not None and r["vocab"] >= goal["copy_fraction_from_vocab"]:
            out.append({"impl": r["impl"], "case": _label(r), "measure": "copy_fraction",
                        "value": r["copy_fraction"], "goal": f">= {goal['copy_fraction_min']}",
                        "met": r["copy_fraction"] >= goal["copy_fraction_min"]})
        if r.get("x_gemm") is not None:
            out.append({"impl": r["impl"], "case": _label(r), "measure": "x_gemm",
                        "value": r["x_gemm"], "goal": f"<= {goal['x_gemm_max']}",
                        "met": r["x_gemm"] <= goal["x_gemm_max"]})
    return out


def _label(r: dict) -> str:
    h = f" H={r['hidden']}" if r.get("hidden") else ""
    return f"{r['workload']} V={r['vocab']} N={r['tokens']}{h} {r['dtype']}"


# ---------------------------------------------------------------- the cost model of estimates

# Effective logits bandwidth of one step (bytes/s) and a fixed cost per (case, impl): imports,
# input generation, allocator warm-up. Crude on purpose: it orders stages, it does not judge.
_RATE = {"cpu": 1.5e9, "cuda": 1.0e12}
_FIXED = {"cpu": 0.3, "cuda": 0.1}
_COMPILE_S = {"cpu": 12.0, "cuda": 15.0}
_SLOW = {"eager": 3.0, "torch.compile": 2.0, "trl.selective_log_softmax": 4.0}


def estimate_s(case: Case, impl, p, device) -> float:
    """Rough seconds to time ``impl`` on ``case`` under preset ``p`` (warm-up included)."""
    dev = torch.device(device).type
    nbytes = case.logits_bytes() * max(case.logits_passes(), 1)
    if case.kind != "logits":
        nbytes = case.logits_bytes() * 4 + case.flops() / (50 if dev == "cpu" else 2000)
    step = nbytes / _RATE[dev] * _SLOW.get(impl.name, 1.0)
    warmup, repeats = p.runs_for(case, impl) if hasattr(p, "runs_for") else (p.warmup,
                                                                              p.repeats)
    runs = warmup + min(repeats, max(3, int(p.max_seconds / max(step, 1e-6))))
    compiles = "compile" in impl.name or impl.name == "liger.fused_linear_dpo"
    extra = _COMPILE_S[dev] if compiles else 0.0
    return _FIXED[dev] + runs * step + extra
