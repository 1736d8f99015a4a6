"""The slowdown beside a busy process, measured in pairs (``fastdpo bench --preset lmhead-busy``).

A quiet run and a ``--busy`` run an hour apart compare two moods of the machine: this box's speed
drifts by 10-20% between sessions, as much as the effect measured. Here each round times every
implementation once on a quiet machine, then starts ``busy`` processes spinning a core each, lets
them settle and times every implementation again; the order of the implementations rotates each
round. An implementation's slowdown is the median over rounds of busy / quiet *within* a round,
so drift between rounds cancels. The issue's goal: fastdpo's slowdown no worse than eager's.

``extra_threads = k`` adds, for fastdpo and eager, the same step run with ``k`` torch threads more
than the machine's setting (``<impl> +k threads``): the knob a user has when the box is shared.
"""

from __future__ import annotations

import statistics
import time

import torch

from .impls import Impl
from .machine import competing_load
from .presets import COMPILES_FIRST_CALL
from .timing import measure
from .workloads import Case, build_step, unavailable

SETTLE_S = 0.5  # after starting the competing processes, before the first busy step
GOAL_PEER = "eager"


def _time_once(step, threads: int) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure(step.run, setup=step.setup, warmup=0, repeats=1).median_s
    finally:
        torch.set_num_threads(before)


def _threaded(impl: Impl) -> bool:
    return impl.family == "fastdpo" or impl.name == GOAL_PEER


def paired_case(case: Case, impls: list[Impl], device, *, rounds: int, busy: int = 1,
                warmup: bool = True, extra_threads: int = 0, log=print) -> list[dict]:
    """One row per implementation (and thread variant) of ``case``: quiet and busy samples,
    round by round, and the median slowdown (module doc). ``warmup=False`` (a heavy case after
    smaller ones) still warms up what compiles on its first call."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if busy < 1:
        raise ValueError(f"busy must be >= 1 competing process, got {busy}")
    if extra_threads < 0:
        raise ValueError(f"extra_threads must be >= 0, got {extra_threads}")
    base_threads = torch.get_num_threads()
    base = {**case.to_dict(), "device": str(device), "busy_processes": busy}
    rows, runs = [], {}  # label -> (step, threads)
    for impl in impls:
        why = unavailable(impl, case, device)
        if why:
            rows.append({**base, "impl": impl.name, "threads": base_threads,
                         "status": "unavailable", "reason": why})
            continue
        step = build_step(case, impl, device)
        runs[impl.name] = (step, base_threads)
        if extra_threads and _threaded(impl):
            runs[f"{impl.name} +{extra_threads} threads"] = (step, base_threads + extra_threads)
        if warmup or impl.name in COMPILES_FIRST_CALL:  # never time a compiler
            step.run(step.setup())
    names = list(runs)
    quiet = {n: [] for n in names}
    loaded = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for n in order:
            quiet[n].append(_time_once(*runs[n]))
        with competing_load(busy):
            time.sleep(SETTLE_S)
            for n in order:
                loaded[n].append(_time_once(*runs[n]))
        log(f"  {case.label()} round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {loaded[n][-1] / quiet[n][-1]:.2f}x" for n in order))
    for n in names:
        ratios = [b / q for q, b in zip(quiet[n], loaded[n])]
        rows.append({**base, "impl": n, "threads": runs[n][1], "status": "ok", "rounds": rounds,
                     "quiet_s": quiet[n], "busy_s": loaded[n], "slowdowns": ratios,
                     "quiet_median_s": statistics.median(quiet[n]),
                     "busy_median_s": statistics.median(loaded[n]),
                     "slowdown": statistics.median(ratios)})
    return rows


def verdicts(rows: list[dict], peer: str = GOAL_PEER) -> list[dict]:
    """Per case and fastdpo row (each thread variant): its slowdown against ``peer``'s at the
    machine's thread setting, in the same rounds."""
    key = ("workload", "vocab", "tokens", "hidden", "dtype")
    ref = {tuple(r[k] for k in key): r for r in rows
           if r["impl"] == peer and r["status"] == "ok"}
    out = []
    for r in rows:
        p = ref.get(tuple(r[k] for k in key))
        if r["status"] != "ok" or not r["impl"].startswith("fastdpo") or p is None:
            continue
        out.append({"impl": r["impl"], "case": [r["tokens"], r["hidden"], r["vocab"]],
                    "slowdown": r["slowdown"], f"{peer}_slowdown": p["slowdown"],
                    "met": r["slowdown"] <= p["slowdown"]})
    return out


def table(rows: list[dict], peer: str = GOAL_PEER) -> str:
    """Plain-text summary: per case and implementation the quiet and busy medians and the
    slowdown, with the fastdpo rows' verdict against ``peer``."""
    lines = [f"{'(N, H, V)':22s} {'impl':34s} {'quiet':>10s} {'busy':>10s} {'slowdown':>9s} "
             f"{'per round':>24s}"]
    met = {(v["impl"], tuple(v["case"])): v["met"] for v in verdicts(rows, peer)}
    for r in rows:
        shape = f"({r['tokens']}, {r['hidden']}, {r['vocab']})"
        if r["status"] != "ok":
            lines.append(f"{shape:22s} {r['impl']:34s} {r['status']}: {r.get('reason', '')}")
            continue
        v = met.get((r["impl"], (r["tokens"], r["hidden"], r["vocab"])))
        tail = "" if v is None else f"  (<= {peer}'s: {'met' if v else 'NOT met'})"
        per = " ".join(f"{x:.2f}" for x in r["slowdowns"])
        lines.append(f"{shape:22s} {r['impl']:34s} {r['quiet_median_s'] * 1e3:8.0f}ms "
                     f"{r['busy_median_s'] * 1e3:8.0f}ms {r['slowdown']:8.2f}x {per:>24s}{tail}")
    return "\n".join(lines)
