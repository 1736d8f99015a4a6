"""What the hardware can do, measured in the same run, and each row's place against it.

* Copy bandwidth: a device-to-device copy of a buffer far larger than the last-level cache,
  counting bytes read plus bytes written. A logits-path step must read (and for the backward,
  write) at least :meth:`Case.logits_passes` logits-sized tensors; that over its median time,
  divided by the copy bandwidth, is its ``copy_fraction``.
* Bare matrix products: the products a fused LM-head step stands for (:meth:`Case.gemms`), timed
  with cuBLAS (``torch.mm`` into preallocated outputs) on the same shapes and dtype;
  ``x_gemm = median / gemm_s``.

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


def gemm_time(case: Case, device, repeats: int = 10) -> dict:
    """Median time of the bare products of ``case.gemms()`` in the case's dtype."""
    device = torch.device(device)
    dt = case.torch_dtype
    operands = []
    for i, (m, n, k) in enumerate(case.gemms()):
        a = _randn((m, k), dt, device, 11 + i)
        b = _randn((k, n), dt, device, 23 + i)
        operands.append((a, b, torch.empty((m, n), dtype=dt, device=device)))

    def run(_):
        for a, b, out in operands:
            torch.mm(a, b, out=out)

    t = measure(run, device=device, warmup=2, repeats=repeats)
    return {"median_s": t.median_s, "flops": case.flops(),
            "tflops": case.flops() / t.median_s / 1e12, "iqr_rel": t.iqr_rel}


class Ceilings:
    """The copy bandwidth of this run, and bare-product times per LM-head case (cached)."""

    def __init__(self, device, log=print, copy_bytes: int | None = None):
        self.device = torch.device(device)
        self.copy = copy_bandwidth(self.device, copy_bytes)
        self.gemm: dict[tuple, dict] = {}
        if log:
            log(f"same-run ceiling: device-to-device copy {self.copy['gbps']:.1f} GB/s "
                f"({self.copy['bytes'] / 2**20:.0f} MiB, read + write)")

    def gemm_for(self, case: Case) -> dict:
        key = (case.gemms(), case.dtype)
        if key not in self.gemm:
            try:
                self.gemm[key] = gemm_time(case, self.device)
            except Exception as exc:  # noqa: BLE001 - the row still stands without its ratio
                self.gemm[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            finally:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return self.gemm[key]

    def relate(self, case: Case, median_s: float) -> dict:
        out = {}
        if case.kind == "logits" and case.logits_passes():
            gbps = case.logits_passes() * case.logits_bytes() / median_s / 1e9
            out.update(copy_gbps=self.copy["gbps"], copy_fraction=gbps / self.copy["gbps"])
        if case.gemms():
            g = self.gemm_for(case)
            if "median_s" in g:
                out.update(gemm_s=g["median_s"], gemm_tflops=g["tflops"],
                           x_gemm=median_s / g["median_s"])
        return out

    def to_dict(self) -> dict:
        return {"copy": self.copy,
                "gemm": [{"shapes": k[0], "dtype": k[1], **v} for k, v in self.gemm.items()]}


def describe(row: dict) -> str:
    """Short suffix for a progress line: the row against the ceilings."""
    parts = []
    if row.get("copy_fraction") is not None:
        parts.append(f"{row['achieved_gbps']:.0f} GB/s = {row['copy_fraction'] * 100:.0f}% copy")
    if row.get("x_gemm") is not None:
        parts.append(f"{row['x_gemm']:.2f}x bare GEMMs, {row['tflops']:.0f} TFLOP/s")
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
    runs = p.warmup + min(p.repeats, max(3, int(p.max_seconds / max(step, 1e-6))))
    compiles = "compile" in impl.name or impl.name == "liger.fused_linear_dpo"
    extra = _COMPILE_S[dev] if compiles else 0.0
    return _FIXED[dev] + runs * step + extra
