"""GPU kernel quality without a GPU (``fastdpo inspect``).

* :mod:`.traffic`: bytes each Triton kernel moves, counted under the interpreter, against the
  minimum (logits read once, gradient written once).
* :mod:`.static`: ahead-of-time builds for sm_80 / sm_90: registers, spills, shared memory, and
  the width of the global loads/stores in the streaming loops (from the SASS).
* :mod:`.roofline`: bandwidth-bound time estimates on H100 / A100 from the counted bytes.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from . import roofline, static, traffic

VOCABS = (32000, 128256, 152064, 256000)
# Peer kernels whose traffic is not counted here, and why.
NOT_COUNTED = {
    "trl.chunked_logprob": "TRL dispatches its fused-LM-head Triton kernels only for CUDA/XPU "
                           "tensors; on CPU it folds tiles with torch ops",
    "liger.fused_linear_cross_entropy": "the same cross-entropy kernel as liger.cross_entropy, "
                                        "run per token chunk after a matmul",
    "cce": "not attempted: Cut Cross-Entropy's kernels fuse the LM-head matmul (tl.dot tiles), "
           "so their traffic has no logits-sized minimum to compare with",
    "flash_attn.cross_entropy": "flash-attn is not installed",
}


def launch_jobs(traffic_rows) -> list[dict]:
    """One recorded launch per (implementation, op, dtype, kernel), from the largest vocabulary
    (test shapes like V = 5003 leave rows unaligned, which no real vocabulary does). fastdpo's
    kernels are left out: they are built from the launchers' own specs (:mod:`fastdpo.triton.aot`)
    at real shapes."""
    best: dict[tuple, tuple] = {}
    for r in traffic_rows:
        for ln in r.get("_launches", []):
            if ln["module"].startswith("fastdpo."):
                continue
            key = (r["impl"], r["op"], r["dtype"], ln["module"], ln["qualname"])
            if key not in best or r["V"] > best[key][0]:
                best[key] = (r["V"], ln)
    return [{"source": "launch", "impl": k[0], "op": k[1], "dtype": k[2], "V": v,
             **{f: ln[f] for f in ("module", "qualname", "params", "options")}}
            for k, (v, ln) in best.items()]


def traffic_cases(quick: bool):
    cases = traffic.default_cases(vocabs=(5003,))
    vocabs = (32000, 128256) if quick else VOCABS
    cases += traffic.default_cases(vocabs=vocabs, B=1, T=2)
    cases += [traffic.TrafficCase("fastdpo[triton].linear", op, 24, 48, 300, "float32", "default")
              for op in ("fwd", "bwd")]
    return cases


def run(quick: bool = True, archs=static.ARCHS, cuda_root: str | None = None, log=print) -> dict:
    t0 = time.perf_counter()
    log("traffic: counting loads/stores under TRITON_INTERPRET=1 ...")
    trows = traffic.measure(traffic_cases(quick))
    log(f"  {len(trows)} cases in {time.perf_counter() - t0:.0f} s")
    jobs = static.fastdpo_spec_jobs(dtypes=("float32", "bfloat16") if quick else
                                    static.TRITON_DTYPES)
    # Every fused-linear variant (and the logits kernels again) at a real shape.
    jobs += static.fastdpo_aot_jobs([(1, 4096, 4096, 128256)], dtypes=("bfloat16",) if quick else
                                    static.TRITON_DTYPES)
    jobs += launch_jobs(trows)
    t1 = time.perf_counter()
    log(f"static: compiling {len(jobs)} kernels x {len(archs)} architectures ahead of time ...")
    srows = static.compile_all(jobs, archs, cuda_root)
    log(f"  done in {time.perf_counter() - t1:.0f} s")
    est = roofline.estimate(trows, 8192, VOCABS, ("bfloat16", "float32"))
    for r in trows:
        r.pop("_launches", None)
    return {"traffic": trows, "static": srows, "roofline": est, "not_counted": NOT_COUNTED,
            "elapsed_s": time.perf_counter() - t0}


def traffic_table(rows) -> str:
    lines = [f"{'impl':24s} {'op':12s} {'dtype':9s} {'V':>7s} {'bytes/token':>12s} "
             f"{'min/token':>10s} {'ratio':>7s} {'logits reads/row':>16s}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['impl']:24s} {r['op']:12s} {r['dtype']:9s} {r['V']:7d} "
                         f"not run: {r['error'][:80]}")
            continue
        per = r["B"] * r["T"] if r["impl"] != "fastdpo[triton].linear" else r["B"]
        reads = r.get("logits_reads_per_active_row")
        reads = "-" if reads is None else f"{reads:.3f}"
        lines.append(f"{r['impl']:24s} {r['op']:12s} {r['dtype']:9s} {r['V']:7d} "
                     f"{r['total_bytes'] / per:12.1f} {r['minimum_bytes'] / per:10.1f} "
                     f"{r['ratio']:7.3f} {reads:>16s}")
    return "\n".join(lines)


def short_kernel(name: str) -> str:
    """``logps_fwd_kernel<float, false, 512>`` from a demangled C++ signature."""
    name = re.sub(r"^void\s+", "", name)
    name = re.sub(r"\((?!anonymous).*$", "", name)
    return name.replace("fastdpo::cuda::", "").replace("(anonymous namespace)::", "")


def static_table(rows) -> str:
    lines = [f"{'impl':24s} {'kernel':36s} {'op/dtype':16s} {'arch':6s} {'regs':>4s} "
             f"{'spill':>7s} {'smem':>6s} {'warps':>5s} {'loop ld bits':>12s} "
             f"{'loop st bits':>12s}"]
    for r in rows:
        what = (f"{r.get('op') or ''}/{r.get('dtype') or ''}" if r.get("op") else
                str(r.get("source", "")).rsplit("/", 1)[-1])
        if r.get("with_entropy"):
            what += "+H"
        if "error" in r:
            lines.append(f"{r.get('impl', '?'):24s} {r.get('qualname', r.get('source', '')):30s} "
                         f"{what:16s} {r['arch']:6s} error: {r['error'][:90]}")
            continue
        s = r.get("sass") or {}
        spill = (r.get("spill_store_bytes") or 0) + (r.get("spill_load_bytes") or 0)
        ld = f"{s.get('narrowest_loop_load')}-{s.get('widest_loop_load')}" \
            if s.get("loop_loads") else "-"
        st = f"{s.get('narrowest_loop_store')}-{s.get('widest_loop_store')}" \
            if s.get("loop_stores") else "-"
        kname = short_kernel(r["kernel"])
        if len(kname) > 36:  # CUDA template instances: the kernel line carries the variant
            lines.append(f"{r['impl']:24s} {kname}")
            kname = ""
        lines.append(f"{r['impl']:24s} {kname:36s} {what:16s} {r['arch']:6s} "
                     f"{r['registers']!s:>4s} {spill:7d} {r['shared_bytes']:6d} "
                     f"{r.get('num_warps', '-')!s:>5s} {ld:>12s} {st:>12s}")
    return "\n".join(lines)


def roofline_table(rows) -> str:
    lines = ["ESTIMATES (bytes / peak HBM bandwidth; not measured), N = 8192 tokens",
             f"{'impl':24s} {'dtype':9s} {'V':>7s} {'gpu':28s} {'step passes':>11s} "
             f"{'step ms':>8s} {'ref ms':>8s}"]
    for r in rows:
        sp = r.get("logits_passes_step")
        sp = "-" if sp is None else f"{sp:.2f}"
        lines.append(f"{r['impl']:24s} {r['dtype']:9s} {r['vocab']:7d} {r['gpu']:28s} "
                     f"{sp:>11s} "
                     f"{r.get('step_ms_est', float('nan')):8.3f} "
                     f"{r.get('ref_ms_est', float('nan')):8.3f}")
    return "\n".join(lines)


def write(res: dict, out: Path, machine: dict) -> list[Path]:
    from .. import report
    from ..machine import machine_tag

    tag, ts = machine_tag(machine), report.stamp(machine)
    obj = {"kind": "inspect", "machine": machine, **res,
           "notes": {"traffic": "counted under TRITON_INTERPRET=1 on CPU tensors, masked-in "
                                "elements only; launch configuration as stated per row",
                     "static": "triton.compile / nvcc ahead of time; spills from ptxas -v; loop "
                               "widths from cuobjdump -sass (backward branches delimit loops)",
                     "roofline": "estimate = bytes / vendor peak bandwidth"}}
    files = report.write_json(obj, out, "inspect", tag, ts)
    flat = []
    for r in res["static"]:
        s = r.get("sass") or {}
        flat.append({k: v for k, v in r.items() if k not in ("sass", "constexprs", "options")}
                    | {f"sass_{k}": v for k, v in s.items() if not isinstance(v, (list, dict))})
    files += report.write_csv(flat, machine, out, "inspect-static", tag, ts)
    files += report.write_csv([{k: v for k, v in r.items() if k not in ("by_tensor", "launches")}
                               for r in res["traffic"]], machine, out, "inspect-traffic", tag, ts)
    return files
