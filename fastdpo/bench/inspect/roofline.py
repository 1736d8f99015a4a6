"""Roofline *estimates* of GPU time from counted bytes: time >= bytes / peak HBM bandwidth.

These are not measurements. A log-prob kernel does a few flops per byte, far below the H100's or
A100's ridge point, so memory bandwidth bounds it; the figure is that bound at the vendor's peak
bandwidth (real kernels reach roughly 80-90% of it).
"""

from __future__ import annotations

# Vendor peak DRAM bandwidth, bytes/s.
GPUS = {"H100-SXM (HBM3, 3.35 TB/s)": 3.35e12, "A100-80GB (HBM2e, 2.0 TB/s)": 2.0e12}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
SMALL_BYTES_PER_TOKEN = 24  # labels (int64) + O(1) fp32 per-token values: negligible next to V


def passes(traffic_rows, impl: str, dtype: str, V: int | None = None) -> dict:
    """Logits-sized passes per op measured for ``impl`` (closest vocabulary to ``V``)."""
    rows = [r for r in traffic_rows if r.get("impl") == impl and r.get("dtype") == dtype
            and "error" not in r and "ratio" in r]
    out = {}
    for r in rows:
        need = 2 if r["op"] in ("bwd", "bwd_inplace", "fwd_bwd") else 1  # minimum passes
        cand = (abs(r["V"] - V) if V else 0, -r["V"])
        if r["op"] not in out or cand < out[r["op"]][0]:
            out[r["op"]] = (cand, need * r["ratio"])
    return {k: v[1] for k, v in out.items()}


def estimate(traffic_rows, tokens: int, vocabs, dtypes=("bfloat16",)) -> list[dict]:
    """Estimated bound for a training step (forward + backward) and a reference pass (forward)."""
    out = []
    impls = sorted({r["impl"] for r in traffic_rows if "ratio" in r and r["impl"] !=
                    "fastdpo[triton].linear"})
    for impl in impls:
        for dt in dtypes:
            for V in vocabs:
                p = passes(traffic_rows, impl, dt, V)
                if not p:
                    continue
                logits = tokens * V * ITEMSIZE[dt]
                step = p.get("fwd_bwd")
                if step is None and "fwd" in p and ("bwd" in p or "bwd_inplace" in p):
                    step = p["fwd"] + p.get("bwd_inplace", p.get("bwd"))
                ref = p.get("fwd") if impl != "liger.cross_entropy" else None
                for gpu, bw in GPUS.items():
                    row = {"impl": impl, "dtype": dt, "tokens": tokens, "vocab": V, "gpu": gpu,
                           "logits_passes_step": step, "logits_passes_ref": ref,
                           "estimate": "bytes / peak bandwidth (lower bound, not measured)"}
                    if step is not None:
                        b = step * logits + 3 * SMALL_BYTES_PER_TOKEN * tokens
                        row["step_bytes"] = b
                        row["step_ms_est"] = b / bw * 1e3
                    if ref is not None:
                        b = ref * logits + SMALL_BYTES_PER_TOKEN * tokens
                        row["ref_bytes"] = b
                        row["ref_ms_est"] = b / bw * 1e3
                    out.append(row)
    return out
