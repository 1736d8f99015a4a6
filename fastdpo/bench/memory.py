"""Peak memory of each implementation vs vocabulary and tokens, bytes saved for backward, budgets.

Peak (the step's *extra* memory, inputs excluded):

* CUDA: ``max_memory_allocated`` during the step minus ``memory_allocated`` before it.
* CPU: each case runs in a fresh interpreter (``python -m fastdpo.bench._memory_child``). The child
  imports, builds the inputs and runs the step once untimed (compilation, thread pools, allocator
  growth), frees its outputs, builds fresh inputs, then resets the kernel's high-water mark
  (``echo 5 > /proc/self/clear_refs``) so ``VmHWM`` restarts at the current ``VmRSS``, runs the step
  and reads ``VmHWM`` from ``/proc/self/status``. Peak = VmHWM - VmRSS-before-the-step: the inputs
  are resident before, so they are not counted; what the step allocates (gradients included) is.
  ``ru_maxrss`` is not used: a child's starts at the parent's peak.

Saved for backward: bytes of the unique storages packed by autograd during the forward
(``torch.autograd.graph.saved_tensors_hooks``), with and without the step's own inputs (saving the
logits costs nothing extra; saving a softmax-sized tensor does). Device independent.

Budget: per implementation, a least-squares line ``total(tokens) = a + b * tokens`` through the
measured totals (extra peak + inputs) at fixed vocabulary, solved for the largest batch of
``T``-token sequences under ``X`` GiB.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace

import torch

from .impls import Impl
from .lmhead import relate_memory
from .workloads import Case, build_step, inputs_bytes, make_inputs, supports, unavailable

GiB = 1 << 30


# ---------------------------------------------------------------- /proc readings


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    if not m:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(m.group(1))


def reset_peak_rss() -> bool:
    """Restart VmHWM at the current VmRSS (Linux >= 4.0). False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- saved tensors


def saved_for_backward(fn, args, exclude=()) -> dict:
    """Unique storages autograd packs while ``fn(*args)`` runs; ``exclude``: tensors not counted
    in ``saved_bytes_extra`` (the inputs, already resident)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    ex = {t.untyped_storage().data_ptr() for t in exclude}
    total = sum(seen.values())
    extra = sum(v for k, v in seen.items() if k not in ex)
    del out
    return {"saved_bytes": total, "saved_bytes_extra": extra, "saved_storages": len(seen)}


def saved_bytes_case(case: Case, impl: Impl, device) -> dict | None:
    """Bytes saved for backward by ``impl`` on the forward of ``case`` (logits/linear kinds)."""
    if case.kind not in ("logits", "linear") or case.workload == "logps_ref":
        return None
    fn = impl.build(case.kind, case)
    inp = make_inputs(case, device, grad=True)
    if case.kind == "logits":
        args = (inp["logits"], inp["labels"])
    else:
        args = (inp["hidden"], inp["weight"], inp["labels"])
    return saved_for_backward(fn, args, exclude=list(inp.values()))


# ---------------------------------------------------------------- one case (runs in the child)


def small_version(case: Case) -> Case:
    """The same workload at a few tokens and a small vocabulary: a warm-up that starts the thread
    pools and libraries of a heavy case without paying for a whole step of it."""
    return replace(case, tokens=16 * case.batch, vocab=min(case.vocab, 1024))


def measure_case(case: Case, impl: Impl, device, *, saved: bool = True,
                 small_warmup: bool = False) -> dict:
    """Peak extra memory of one step of ``case`` by ``impl`` in *this* process (see module doc).
    ``small_warmup``: warm up on :func:`small_version` (not for implementations that compile
    per shape)."""
    device = torch.device(device)
    out: dict = {"inputs_bytes": None, "logits_bytes": case.logits_bytes()}
    step = build_step(case, impl, device, fresh_inputs_every_call=True)
    warm = build_step(small_version(case), impl, device) if small_warmup else step
    t0 = time.perf_counter()
    res = warm.run(warm.setup())  # warm-up: compile, thread pools, first-touch of allocator pools
    del res, warm
    out["warmup_s"] = time.perf_counter() - t0
    out["warmup"] = "small case" if small_warmup else "same case"
    state = step.setup()  # fresh inputs (the warm-up may have consumed them in place)
    out["inputs_bytes"] = inputs_bytes(state)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        res = step.run(state)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        out["method"] = "torch.cuda.max_memory_allocated - memory_allocated before the step"
    else:
        import gc

        gc.collect()
        base_kib = proc_status_kib("VmRSS")
        if not reset_peak_rss():
            raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs not writable)")
        res = step.run(state)
        peak = (proc_status_kib("VmHWM") - base_kib) * 1024
        out["method"] = "VmHWM after the step - VmRSS before it (fresh interpreter, HWM reset)"
        out["baseline_rss_bytes"] = base_kib * 1024
    del res, state
    out["peak_extra_bytes"] = max(peak, 0)
    if saved:
        try:
            out.update(saved_bytes_case(case, impl, device) or {})
        except Exception as exc:  # noqa: BLE001 - reported, the peak still stands
            out["saved_error"] = f"{type(exc).__name__}: {exc}"
    return out


# ---------------------------------------------------------------- parent side


def run_isolated(case: Case, impl_name: str, device, *, timeout: float = 900,
                 saved: bool = True, small_warmup: bool = False) -> dict:
    """Run :func:`measure_case` in a fresh interpreter; its last stdout line is the JSON result."""
    spec = json.dumps({"case": case.to_dict(), "impl": impl_name, "device": str(device),
                       "saved": saved, "small_warmup": small_warmup})
    env = dict(os.environ)
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile worker pool in the RSS
    try:
        p = subprocess.run([sys.executable, "-m", "fastdpo.bench._memory_child", spec],
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        why = "killed (out of memory?)" if p.returncode in (-9, 137) else " | ".join(tail)
        return {"status": "error", "reason": f"child exit {p.returncode}: {why}"[:500]}
    return json.loads(lines[-1])


def _finish(row: dict, case: Case) -> dict:
    if row.get("status") == "ok":
        lb = case.logits_bytes()
        row["peak_extra_x_logits"] = row["peak_extra_bytes"] / lb
        row["peak_total_bytes"] = row["peak_extra_bytes"] + row["inputs_bytes"]
        row["peak_total_x_logits"] = row["peak_total_bytes"] / lb
        row.update(relate_memory(row, case))
    return row


def _in_process(case: Case, impl: Impl, device, saved: bool) -> dict:
    try:
        return {"status": "ok", **measure_case(case, impl, device, saved=saved)}
    except Exception as exc:  # noqa: BLE001
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def profile(cases, impls: list[Impl], device, *, isolated: bool | None = None, saved=True,
            log=print, skip=None, deadline: float | None = None,
            workers: int | None = None, skip_why=None, timeout: float = 900,
            small_warmup=None) -> list[dict]:
    """Rows of peak memory for every (case, implementation) that can run here; ``skip(impl,
    case)`` true leaves a pair out (a preset saving time); ``skip_why(impl, case)`` non-empty
    makes it a ``skipped`` row with that reason (a row limit). Isolated children run ``workers``
    at a time (default: 2 when the machine has 2 cores or more; peaks are per process, so children
    side by side do not disturb each other's readings), each killed after ``timeout`` seconds.
    ``deadline`` (``time.monotonic()``): pairs not started by then are ``skipped``.
    ``small_warmup(impl, case)`` true: that child warms up on a small case
    (:func:`measure_case`)."""
    from concurrent.futures import ThreadPoolExecutor

    from .ceilings import estimate_s
    from .progress import Progress

    device = torch.device(device)
    isolated = device.type == "cpu" if isolated is None else isolated
    rows, todo = [], []
    for case in cases:
        for impl in impls:
            if not supports(impl, case) or (skip and skip(impl, case)):
                continue
            row = {**case.to_dict(), "device": device.type, "impl": impl.name,
                   "family": impl.family, "logits_bytes": case.logits_bytes()}
            why = unavailable(impl, case, device)
            if why:
                rows.append({**row, "status": "unavailable", "reason": why})
            elif skip_why and (why := skip_why(impl, case)):
                rows.append({**row, "status": "skipped", "reason": why})
            else:
                todo.append((case, impl, row))
    if not todo:
        return rows
    workers = workers or (min(2, os.cpu_count() or 1) if isolated else 1)

    class _P:  # the cost model's preset: one warm-up run and one measured run
        warmup, repeats, max_seconds = 1, 1, 0.0

    startup = 6.0 if isolated else 0.0
    how = f"isolated processes, {workers} at a time" if isolated else "in process"
    prog = Progress(f"memory profile ({how})",
                    [(startup + estimate_s(c, i, _P, device)) / workers for c, i, _ in todo], log)

    def one(item):
        case, impl, row = item
        t0 = time.perf_counter()
        if deadline is not None and time.monotonic() > deadline:
            res = {"status": "skipped", "reason": "the run's time limit was spent before this pair"}
        elif isolated:
            res = run_isolated(case, impl.name, device, saved=saved, timeout=timeout,
                               small_warmup=bool(small_warmup and small_warmup(impl, case)))
        else:
            res = _in_process(case, impl, device, saved)
        return _finish({**row, **res}, case), time.perf_counter() - t0

    # In-process profiles stay on this thread (CUDA streams, torch.compile).
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(one, todo) if workers > 1 else map(one, todo)
        for k, (row, dt) in enumerate(results):
            rows.append(row)
            prog.done(k)
            if log:
                extra = (f"extra {row['peak_extra_bytes'] / GiB:.3f} GiB = "
                         f"{row['peak_extra_x_logits']:.2f}x logits"
                         if row.get("status") == "ok" else
                         f"{row.get('status')}: {row.get('reason', '')}")
                case = todo[k][0]
                log(f"  [memory] {prog.tag(k)} {case.label():52s} {row['impl']:28s} {extra} "
                    f"({dt:.0f} s)")
    prog.finish()
    return rows


# ---------------------------------------------------------------- scaling fit and budget


def fit_scaling(rows) -> list[dict]:
    """``total = a + b * tokens`` per (workload, impl, vocab, dtype) with >= 2 token counts."""
    groups: dict[tuple, list] = {}
    for r in rows:
        if r.get("status") == "ok":
            key = (r["workload"], r["impl"], r["vocab"], r["dtype"], r.get("hidden", 0))
            groups.setdefault(key, []).append((r["tokens"], r["peak_total_bytes"],
                                               r["peak_extra_bytes"]))
    fits = []
    for (wl, impl, V, dt, H), pts in sorted(groups.items()):
        if len({n for n, _, _ in pts}) < 2:
            continue
        n = len(pts)
        mx = sum(p[0] for p in pts) / n
        my = sum(p[1] for p in pts) / n
        sxx = sum((p[0] - mx) ** 2 for p in pts)
        b = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
        a = my - b * mx
        fits.append({"workload": wl, "impl": impl, "vocab": V, "dtype": dt, "hidden": H,
                     "a_bytes": a, "b_bytes_per_token": b, "points": len(pts),
                     "tokens": sorted({p[0] for p in pts})})
    return fits


def budget(fits, gib: float, seq_len: int) -> list[dict]:
    """Largest batch of ``seq_len``-token sequences whose fitted total stays under ``gib`` GiB."""
    out = []
    for f in fits:
        cap = gib * GiB
        b = f["b_bytes_per_token"]
        max_tokens = int((cap - max(f["a_bytes"], 0.0)) // b) if b > 0 else None
        out.append({**{k: f[k] for k in ("workload", "impl", "vocab", "dtype")},
                    "budget_gib": gib, "seq_len": seq_len, "max_tokens": max_tokens,
                    "max_batch": (max_tokens // seq_len) if max_tokens is not None else None,
                    "bytes_per_token": b})
    return out


def table(rows) -> str:
    lines = [f"{'case':48s} {'impl':30s} {'extra peak':>12s} {'x logits':>9s} "
             f"{'total x':>8s} {'saved extra':>12s}"]
    missing: dict[str, str] = {}
    for r in rows:
        case = f"{r['workload']} V={r['vocab']} N={r['tokens']} {r['dtype']}"
        if r.get("status") == "unavailable":
            missing.setdefault(r["impl"], r.get("reason", ""))
            continue
        if r.get("status") != "ok":
            lines.append(f"{case:48s} {r['impl']:30s} {r.get('status')}: {r.get('reason', '')}")
            continue
        saved = r.get("saved_bytes_extra")
        saved_s = f"{saved / 2**20:10.1f}Mi" if saved is not None else "-"
        lines.append(f"{case:48s} {r['impl']:30s} {r['peak_extra_bytes'] / GiB:10.3f}Gi "
                     f"{r['peak_extra_x_logits']:9.2f} {r['peak_total_x_logits']:8.2f} "
                     f"{saved_s:>12s}")
    lines += [f"not profiled: {k}: {v}" for k, v in missing.items()]
    return "\n".join(lines)
