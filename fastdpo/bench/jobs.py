"""The jobs behind ``fastdpo bench`` and ``fastdpo memory``: run, print, write reports."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from . import busy as busy_mod
from . import memory as mem
from . import report
from .ceilings import Ceilings, goals
from .impls import by_name, split_names
from .limits import RowLimits
from .lmhead import table as lmhead_table
from .machine import machine_info, machine_tag
from .presets import (GPU_GOALS, HEAVY_FLOPS, LMHEAD_BUSY_EXTRA_THREADS, LMHEAD_BUSY_IMPLS,
                      NATIVE_TARGET, busy_rounds, lmhead_busy_cases, preset)
from .runner import native_target_memory, native_target_summary, run_preset

GiB = 1 << 30
# Share of --time-limit the timed sweep may use before the memory profile starts.
SWEEP_SHARE = 0.8


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _impls(names):
    return by_name(split_names(names) if isinstance(names, str) else names)


def _write_plot(rows, key, ylabel, title, out, kind, tag, ts, say, **kw) -> list[Path]:
    why = report.plots_unavailable()
    if why:
        say(f"plots skipped: {why} (JSON and CSV written)")
        return []
    return report.write_plot(rows, key, ylabel, title, out, kind, tag, ts, **kw)


def print_native_target(s: dict, log=print) -> None:
    c = s["case"]
    log(f"\nnative CPU target: {c['workload']} fp32 N={c['tokens']} V={c['vocab']} "
        f"on {s['device']}: {s['status']}")
    if s["status"] != "measured":
        return
    log(f"  fastdpo[native] median {s['median_s'] * 1e3:.1f} ms")
    for peer, x in s["speedups"].items():
        goal = s["goals"]["speedup_vs"].get(peer)
        g = f"  (goal >= {goal:g}x: {'met' if x is not None and x >= goal else 'NOT met'})" \
            if goal else ""
        log(f"  speedup vs {peer:28s} {x:6.2f}x{g}" if x is not None else
            f"  speedup vs {peer:28s} n/a (not timed)")
    for impl, x in s.get("peak_total_x_logits", {}).items():
        log(f"  peak memory (inputs + step) {impl:28s} {x:5.2f}x logits")
    key = [k for k in s["met"] if k.startswith("peak")]
    if key:
        log(f"  peak goal {key[0]}: {'met' if s['met'][key[0]] else 'NOT met'}")


def print_goals(rows: list[dict], log=print) -> list[dict]:
    g = goals(rows, GPU_GOALS)
    if g:
        log("\ngoals (fastdpo rows against the same run's ceilings):")
        for x in g:
            log(f"  {x['impl']:18s} {x['case']:44s} {x['measure']:13s} {x['value']:6.3f} "
                f"(goal {x['goal']}: {'met' if x['met'] else 'NOT met'})")
    return g


def _preset(name, device, row_limit_s=None):
    p = preset(name, device)
    return replace(p, row_limit_s=row_limit_s) if row_limit_s is not None else p


def _default_impls(p):
    return by_name(p.impls) if p.impls else by_name()


def memory_job(preset_name, device, out: Path, *, impls=None, budget_gib=None, seq_len=2048,
               machine=None, log=print, extra_rows=(), deadline=None, row_limit_s=None,
               ceiling=None, timed_rows=()) -> dict:
    """The memory profile of the preset's memory cases. Under a row limit each child is
    predicted (warm-up + measured step, :mod:`.limits`, from ``ceiling`` and the multiples
    measured in ``timed_rows``) and killed after three times the limit."""
    machine = machine or machine_info()
    p = _preset(preset_name, device, row_limit_s)
    impl_list = (_impls(impls) if impls else _default_impls(p) if p.impls else
                 [i for i in by_name() if i.kinds != ("linear_dpo",)])
    log(f"memory profile ({preset_name}, {device}): {len(p.memory_cases)} cases")
    t0 = time.perf_counter()
    limits = RowLimits(p.row_limit_s, ceiling, device)
    for r in timed_rows:
        limits.observe(dict(r))
    timeout = 3 * p.row_limit_s + 60 if p.row_limit_s else 900
    rows = list(extra_rows) + mem.profile(
        p.memory_cases, impl_list, device, log=log, isolated=p.memory_isolated,
        skip=lambda i, c: bool(p.skip_reason(i, c, "memory")), deadline=deadline,
        workers=p.memory_workers, saved=p.memory_saved, timeout=timeout,
        skip_why=lambda i, c: limits.skip_reason(c, i, *p.runs_for(c, i)),
        small_warmup=lambda i, c: p.runs_for(c, i)[0] == 0)
    fits = mem.fit_scaling(rows)
    budgets = mem.budget(fits, budget_gib, seq_len) if budget_gib else []
    log("\n" + mem.table(rows))
    if fits:
        log("\nscaling fit: total peak (inputs + step) = a + b * tokens")
        for f in fits:
            log(f"  {f['workload']} V={f['vocab']} {f['dtype']} {f['impl']:28s} "
                f"a={f['a_bytes'] / 2**20:9.1f} MiB  b={f['b_bytes_per_token'] / 2**10:9.1f} "
                f"KiB/token  ({f['points']} points)")
    if budgets:
        log(f"\nlargest batch of {seq_len}-token sequences in {budget_gib:g} GiB for the log-prob "
            "step alone (its logits + the step's peak; the model is not counted), from the fit:")
        for b in budgets:
            log(f"  {b['workload']} V={b['vocab']} {b['dtype']} {b['impl']:28s} "
                f"{b['max_batch']} sequences ({b['max_tokens']} tokens)")
    tag, ts = machine_tag(machine), report.stamp(machine)
    obj = {"kind": "memory", "machine": machine, "preset": preset_name, "device": device,
           "method": {"cpu": "VmHWM - VmRSS before the step, fresh interpreter per case, HWM "
                             "reset via /proc/self/clear_refs; inputs excluded",
                      "cuda": "max_memory_allocated - memory_allocated before the step",
                      "saved": "unique storages packed by autograd during the forward"},
           "rows": rows, "fits": fits, "budget": budgets,
           "elapsed_s": time.perf_counter() - t0}
    kind = f"{p.files}-memory" if p.files else "memory"
    files = report.write_json(obj, out, kind, tag, ts)
    files += report.write_csv(rows, machine, out, kind, tag, ts)
    files += _write_plot(rows, "peak_extra_bytes", "extra peak memory (GiB)",
                         "peak memory of the step beyond its inputs\n"
                         f"{report.machine_line(machine, sep=chr(10))}", out, kind, tag, ts,
                         log, scale=1 / GiB, log=False)
    log("\nwrote " + ", ".join(str(f) for f in files))
    return obj


def bench_job(preset_name, device, out: Path, *, impls=None, workloads=None, with_memory=True,
              budget_gib=None, seq_len=2048, log=print, time_limit_s=None,
              row_limit_s=None) -> dict:
    """Timed sweep, then the memory report. ``time_limit_s``: the sweep stops starting new pairs
    after ``SWEEP_SHARE`` of it, the memory profile at the end of it (the rest are ``skipped``
    rows); rows are also appended to ``bench-partial.jsonl`` as they are measured.
    ``row_limit_s`` replaces the preset's limit per (case, implementation) (:mod:`.limits`)."""
    machine = machine_info()
    start = time.monotonic()
    sweep_deadline = start + SWEEP_SHARE * time_limit_s if time_limit_s else None
    end = start + time_limit_s if time_limit_s else None
    p = _preset(preset_name, device, row_limit_s)
    impl_list = _impls(impls) if impls else _default_impls(p)
    flag = (f"--{preset_name}" if preset_name in ("quick", "full", "gpu")
            else f"--preset {preset_name}")
    log(f"fastdpo bench {flag} on {report.machine_line(machine)}")
    if machine["triton_interpret"]:
        log("note: TRITON_INTERPRET is set; Triton implementations on CPU are not timed")
    t0 = time.perf_counter()
    ceil = Ceilings(device, log=log)
    partial = out / f"{p.files or 'bench'}-partial.jsonl"
    partial.unlink(missing_ok=True)
    rows = run_preset(p, impl_list, device, log=log, workloads=workloads,
                      deadline=sweep_deadline, ceiling=ceil,
                      on_row=lambda r: report.append_jsonl(r, partial))
    target_mem = []
    if with_memory and p.has_native_target and (not workloads or
                                                NATIVE_TARGET.workload in workloads):
        log("\nnative target: peak memory per implementation (isolated processes)")
        target_mem = native_target_memory(impl_list, device, p, log=log, deadline=end)
    summary = native_target_summary(rows, target_mem, device)
    if p.has_native_target:
        print_native_target(summary, log)
    goal_rows = print_goals(rows, log)
    tag, ts = machine_tag(machine), report.stamp(machine)
    obj = {"kind": "bench", "machine": machine, "preset": preset_name, "device": device,
           "timing": {"cpu": "time.perf_counter around one step", "cuda": "CUDA events, L2 "
                      "flushed before each repeat", "warmup": p.warmup, "repeats": p.repeats,
                      "statistic": "median; spread = quartiles, min, max",
                      "peak": "peak_allocated_bytes: torch.cuda.max_memory_allocated over the "
                              "repeats, inputs included"},
           "ceilings": ceil.to_dict(), "goals": goal_rows, "time_limit_s": time_limit_s,
           "row_limit_s": p.row_limit_s,
           "rows": rows, "native_target": summary, "elapsed_s": time.perf_counter() - t0}
    kind = p.files or "bench"
    files = report.write_json(obj, out, kind, tag, ts)
    files += report.write_csv(rows, machine, out, kind, tag, ts)
    files += _write_plot(rows, "median_s", "median time per step (ms)",
                         f"time per step\n{report.machine_line(machine)}", out, kind, tag, ts,
                         log, scale=1e3)
    log("\nwrote " + ", ".join(str(f) for f in files))
    if with_memory:
        log("")
        obj["memory"] = memory_job(preset_name, device, out, impls=impls, budget_gib=budget_gib,
                                   seq_len=seq_len, machine=machine, log=log,
                                   extra_rows=target_mem, deadline=end,
                                   row_limit_s=row_limit_s, ceiling=ceil, timed_rows=rows)
    text = lmhead_table(rows, obj.get("memory", {}).get("rows", ()))
    if text:
        log("\n" + text)
        if p.files:  # the goal presets' summary, beside their JSON/CSV
            table_files = report.write_text(text, out, f"{p.files}-table", tag, ts)
            log("wrote " + ", ".join(str(f) for f in table_files))
    partial.unlink(missing_ok=True)
    return obj


def busy_job(device, out: Path, *, impls=None, busy: int = 1, cases=None, rounds=None,
             extra_threads: int = LMHEAD_BUSY_EXTRA_THREADS, log=print) -> dict:
    """``fastdpo bench --preset lmhead-busy``: each case's slowdown beside ``busy`` spinning
    processes, quiet and busy steps in paired rounds (:mod:`.busy`); JSON, CSV and the table."""
    machine = machine_info()
    impl_list = _impls(impls) if impls else by_name(LMHEAD_BUSY_IMPLS)
    cases = tuple(cases) if cases is not None else lmhead_busy_cases()
    log(f"fastdpo bench --preset lmhead-busy on {report.machine_line(machine)}: {len(cases)} "
        f"cases, {busy} competing process(es) in the busy half of each round")
    t0 = time.perf_counter()
    rows = []
    for case in cases:
        rows += busy_mod.paired_case(case, impl_list, device, rounds=rounds or busy_rounds(case),
                                     busy=busy, warmup=case.flops() <= HEAVY_FLOPS,
                                     extra_threads=extra_threads, log=log)
    text = busy_mod.table(rows)
    log("\n" + text)
    tag, ts = machine_tag(machine), report.stamp(machine)
    obj = {"kind": "lmhead-busy", "machine": machine, "device": device,
           "method": {"round": "each implementation timed once quiet, then once beside the "
                               "competing processes (started, settled "
                               f"{busy_mod.SETTLE_S} s); order rotated each round",
                      "slowdown": "median over rounds of busy / quiet within the round",
                      "threads": f"torch threads of each row; '+k threads' rows: the machine's "
                                 f"setting + {extra_threads}",
                      "goal": f"fastdpo's slowdown <= {busy_mod.GOAL_PEER}'s"},
           "rows": rows, "verdicts": busy_mod.verdicts(rows),
           "elapsed_s": time.perf_counter() - t0}
    files = report.write_json(obj, out, "lmhead-busy", tag, ts)
    files += report.write_csv(rows, machine, out, "lmhead-busy", tag, ts)
    files += report.write_text(text, out, "lmhead-busy-table", tag, ts)
    log("\nwrote " + ", ".join(str(f) for f in files))
    return obj
