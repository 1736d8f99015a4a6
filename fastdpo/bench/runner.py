"""Timed sweeps: every (case, implementation) that can run here, side by side, with ratios.

Each row carries the case, the implementation, its status (``ok``, ``unavailable`` with the reason,
``skipped`` with the reason, ``error`` with the message) and, when timed, median and spread over the
repeats plus speedups against every peer timed on the same case (``speedup_vs_eager`` is
``eager_median / this_median``). Against the same run's ceilings (:mod:`.ceilings`): a logits-path
row reports the bandwidth it achieved over the bytes it cannot avoid, as a fraction of a
device-to-device copy; a fused LM-head row (CPU and CUDA alike) its time as a multiple of the
bare matrix products of its shapes (``x_gemm``, ``n_gemms``), its FLOPs and achieved rate
(``gflops``). On CUDA each row also has the peak allocated memory of its repeats. A preset with a
row limit skips, saying why, a pair predicted to exceed it or the free memory (:mod:`.limits`).
"""

from __future__ import annotations

import gc
import time

import torch

from . import ceilings
from . import memory as mem
from .impls import Impl
from .limits import RowLimits
from .presets import NATIVE_TARGET, NATIVE_TARGET_GOALS, Preset
from .progress import Progress
from .timing import measure
from .workloads import Case, build_step, supports, unavailable


def time_case(case: Case, impl: Impl, device, *, warmup: int, repeats: int,
              max_seconds: float | None, ceiling: ceilings.Ceilings | None = None,
              adjacent: bool = False) -> dict:
    """One row. ``adjacent``: the case's bare GEMMs are timed again just before the step, as
    its ``x_gemm`` basis (:meth:`.ceilings.Ceilings.adjacent`)."""
    device = torch.device(device)
    row = {**case.to_dict(), "device": device.type, "impl": impl.name, "family": impl.family,
           "note": impl.note, "logits_bytes": case.logits_bytes()}
    if case.gemms():
        row["n_gemms"] = len(case.gemms())
    why = unavailable(impl, case, device)
    if why:
        return {**row, "status": "unavailable", "reason": why}
    cuda = device.type == "cuda"
    near = ceiling.adjacent(case) if (adjacent and ceiling is not None and case.gemms()) else None
    try:
        step = build_step(case, impl, device)
        t0 = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t = measure(step.run, setup=step.setup, device=device, warmup=warmup, repeats=repeats,
                    max_seconds=max_seconds)
        row["wall_s"] = time.perf_counter() - t0
        if cuda:  # inputs included: what the step needs on the device, all told
            row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    except Exception as exc:  # noqa: BLE001 - one failing implementation doesn't stop the sweep
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
        return {**row, "status": "error", "reason": msg}
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    row.update(status="ok", **{k: v for k, v in t.to_dict().items() if k != "samples_s"},
               samples_s=t.samples_s)
    row["tokens_per_s"] = case.tokens * (2 if case.workload == "dpo_step" else 1) / t.median_s
    if case.kind == "logits":
        row["min_bytes"] = case.logits_passes() * case.logits_bytes()
        row["achieved_gbps"] = row["min_bytes"] / t.median_s / 1e9
    if case.gemms():
        row["n_gemms"] = len(case.gemms())
        row["flops"] = case.flops()
        row["tflops"] = row["flops"] / t.median_s / 1e12
        row["gflops"] = row["flops"] / t.median_s / 1e9
    if ceiling is not None:
        row.update(ceiling.relate(case, t.median_s, near))
    return row


def add_ratios(rows: list[dict]) -> None:
    """``speedup_vs_<peer>`` on every timed row, against every other timed row of the same case."""
    key = ("workload", "vocab", "tokens", "dtype", "batch", "hidden", "device")
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in key), []).append(r)
    for group in groups.values():
        timed = {r["impl"]: r["median_s"] for r in group if r.get("status") == "ok"}
        for r in group:
            if r.get("status") != "ok":
                continue
            for other, t in timed.items():
                if other != r["impl"]:
                    r[f"speedup_vs_{other}"] = t / r["median_s"]


def _plan(p: Preset, impls, device, workloads):
    """The (case, impl) pairs to time and the rows of those the preset leaves out."""
    todo, skipped = [], []
    for case in p.cases:
        if workloads and case.workload not in workloads:
            continue
        for impl in impls:
            if not supports(impl, case):
                continue
            skip = p.skip_reason(impl, case, "time")
            if not skip:
                todo.append((case, impl))
            elif case != NATIVE_TARGET:
                skipped.append({**case.to_dict(), "device": torch.device(device).type,
                                "impl": impl.name, "family": impl.family, "status": "skipped",
                                "reason": skip})
    return todo, skipped


def run_preset(p: Preset, impls: list[Impl], device, *, log=print, workloads=None,
               deadline: float | None = None, ceiling: ceilings.Ceilings | None = None,
               on_row=None) -> list[dict]:
    """Time the preset's cases. ``deadline`` (``time.monotonic()``): pairs not started by then are
    rows with status ``skipped`` (the preset orders its cases most important first).
    The first pair always runs. ``on_row(row)`` sees each row as it is made (partial results
    survive an interrupted run). A fused-LM-head pair predicted to exceed the preset's
    ``row_limit_s`` or the free memory is ``skipped`` with the prediction (:mod:`.limits`)."""
    todo, rows = _plan(p, impls, device, workloads)
    limits = RowLimits(p.row_limit_s, ceiling, device)
    told = set()  # implementations whose unavailability was already printed
    prog = Progress("timed sweep", [ceilings.estimate_s(c, i, p, device) for c, i in todo], log)
    for k, (case, impl) in enumerate(todo):
        warmup, repeats = p.runs_for(case, impl)
        base = {**case.to_dict(), "device": torch.device(device).type, "impl": impl.name,
                "family": impl.family}
        if deadline is not None and k > 0 and time.monotonic() > deadline:
            row = {**base, "status": "skipped",
                   "reason": "the run's time limit was spent before this pair"}
        elif not unavailable(impl, case, device) and \
                (why := limits.skip_reason(case, impl, warmup, repeats)):
            row = {**base, "status": "skipped", "reason": why, "limit_skip": True}
        else:
            row = time_case(case, impl, device, warmup=warmup, repeats=repeats,
                            max_seconds=p.max_seconds, ceiling=ceiling, adjacent=p.adjacent(case))
            limits.observe(row)
        rows.append(row)
        if on_row:
            on_row(row)
        prog.done(k)
        quiet = row["status"] in ("unavailable", "skipped") and not row.get("limit_skip")
        if log and not (quiet and impl.name in told):
            if quiet:
                told.add(impl.name)
            if row["status"] == "ok":
                msg = (f"{row['median_s'] * 1e3:10.3f} ms  (IQR {row['iqr_rel'] * 100:4.1f}%,"
                       f" n={row['repeats']}){ceilings.describe(row)}")
            else:
                msg = f"{row['status']}: {row['reason']}"
            log(f"  {prog.tag(k)} {case.label():52s} {impl.name:30s} {msg}")
    prog.finish()
    add_ratios(rows)
    return rows


def native_target_summary(rows: list[dict], mem_rows: list[dict], device) -> dict:
    """The native CPU target on this machine: speedups of fastdpo[native] and its peak memory."""
    case = NATIVE_TARGET
    mine = [r for r in rows if r["impl"] == "fastdpo[native]" and r.get("status") == "ok"
            and r["workload"] == case.workload and r["vocab"] == case.vocab
            and r["tokens"] == case.tokens and r["dtype"] == case.dtype]
    out = {"case": case.to_dict(), "device": torch.device(device).type,
           "goals": NATIVE_TARGET_GOALS, "speedups": {}, "met": {}}
    if not mine:
        nat = [r for r in rows if r["impl"] == "fastdpo[native]"]
        out["status"] = "fastdpo[native] not timed: " + (nat[0].get("reason", "") if nat else "")
        return out
    r = mine[0]
    out["status"] = "measured"
    out["median_s"] = r["median_s"]
    for peer, goal in NATIVE_TARGET_GOALS["speedup_vs"].items():
        s = r.get(f"speedup_vs_{peer}")
        out["speedups"][peer] = s
        out["met"][f"speedup_vs_{peer}>={goal}"] = None if s is None else s >= goal
    if r.get("speedup_vs_fastdpo[torch]") is not None:
        out["speedups"]["fastdpo[torch]"] = r["speedup_vs_fastdpo[torch]"]
    peaks = {m["impl"]: m for m in mem_rows if m.get("status") == "ok"
             and m["workload"] == case.workload and m["vocab"] == case.vocab
             and m["tokens"] == case.tokens and m["dtype"] == case.dtype}
    out["peak_total_x_logits"] = {k: v["peak_total_x_logits"] for k, v in peaks.items()}
    out["peak_extra_x_logits"] = {k: v["peak_extra_x_logits"] for k, v in peaks.items()}
    if "fastdpo[native]" in peaks:
        x = peaks["fastdpo[native]"]["peak_total_x_logits"]
        out["met"][f"peak_total_x_logits<={NATIVE_TARGET_GOALS['peak_x_logits_max']}"] = (
            x <= NATIVE_TARGET_GOALS["peak_x_logits_max"])
    return out


def native_target_memory(impls: list[Impl], device, p: Preset, log=print,
                         deadline=None) -> list[dict]:
    chosen = [i for i in impls if not p.skip_reason(i, NATIVE_TARGET, "memory")]
    return mem.profile([NATIVE_TARGET], chosen, device, log=log, deadline=deadline)
