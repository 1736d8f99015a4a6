"""The fused LM head's figures side by side: time as a multiple of the same run's bare GEMMs, the
FLOPs and rate, and peak extra memory against the goal budget.

Memory goal: a fused head should need no more than *one chunk's logits + 5% of the full logits*
beyond its inputs and the gradients it returns. One chunk is what fastdpo's fused head plans
for the case (:func:`fastdpo.autograd.linear_loss.plan_rows`: 5% of the fp32-in-the-input-dtype
``(N, V)`` logits, at least 16 MiB and 128 rows, times ``V`` fp32 values a row); "full logits" is
one ``(N, V)`` tensor in the case's dtype (a DPO step's reference logits are not added).
"""

from __future__ import annotations

from .ceilings import flop_rate
from .limits import grads_bytes
from .workloads import Case

GOAL_EXTRA_FRACTION = 0.05


def chunk_logits_bytes(case: Case) -> int:
    from fastdpo.autograd.linear_loss import plan_rows

    rows = min(case.tokens, plan_rows(case.tokens, case.vocab, case.torch_dtype.itemsize, False))
    return rows * case.vocab * 4


def goal_budget_bytes(case: Case) -> int:
    return int(chunk_logits_bytes(case) + GOAL_EXTRA_FRACTION * case.logits_bytes())


def relate_memory(row: dict, case: Case) -> dict:
    """Memory-profile fields of a linear row against the goal budget (empty otherwise)."""
    if not case.gemms() or row.get("status") != "ok":
        return {}
    budget = goal_budget_bytes(case)
    scratch = row["peak_extra_bytes"] - grads_bytes(case)
    return {"grads_bytes": grads_bytes(case), "scratch_bytes": scratch,
            "goal_budget_bytes": budget, "chunk_logits_bytes": chunk_logits_bytes(case),
            "scratch_x_goal_budget": scratch / budget,
            "extra_x_goal_budget": row["peak_extra_bytes"] / budget}


_KEY = ("workload", "vocab", "tokens", "hidden", "dtype", "batch", "impl")


def _key(r: dict) -> tuple:
    return tuple(r.get(k) for k in _KEY)


def table(rows: list[dict], mem_rows=()) -> str:
    """One line per fused-LM-head row: time, ``x GEMMs``, FLOPs, rate, and (where the memory
    profile covered it) peak extra memory and its multiple of the goal budget; rows not timed say
    why. Empty when there is no linear row."""
    mem = {_key(m): m for m in mem_rows if m.get("status") in ("ok", "skipped", "error")}
    lines = []
    for r in rows:
        if r.get("hidden", 0) == 0 or r.get("status") == "unavailable":
            continue
        case = f"{r['workload']} N={r['tokens']} H={r['hidden']} V={r['vocab']} {r['dtype']}"
        m = mem.get(_key(r), {})
        if m.get("status") == "ok":
            ms = (f"{m['peak_extra_bytes'] / 2**20:9.0f} MiB "
                  f"{m.get('scratch_x_goal_budget', float('nan')):7.2f}x")
        elif m:
            ms = f"memory {m['status']}: {m.get('reason', '')}"
        else:
            ms = f"{'-':>13s} {'-':>8s}"
        if r.get("status") != "ok":
            mem_s = f"; peak extra {ms.strip()}" if m.get("status") == "ok" else (
                f"; {ms}" if m else "")
            lines.append(f"{case:52s} {r['impl']:30s} {r['status']}: {r.get('reason', '')}"
                         f"{mem_s}")
            continue
        flops = f"{r['flops'] / 1e9:9.1f} GF" if r.get("flops") else f"{'-':>12s}"
        near = "*" if r.get("gemm_basis") == "adjacent" else ""
        xg = (f"{r['x_gemm']:5.2f}x {r.get('n_gemms', '?')}{near}" if r.get("x_gemm") is not None
              else f"{'-':>8s}")
        rate = flop_rate(r["gflops"]) if r.get("gflops") else "-"
        over = "  (over the row limit)" if r.get("over_row_limit") else ""
        lines.append(f"{case:52s} {r['impl']:30s} {r['median_s'] * 1e3:10.1f} {xg:>9s} "
                     f"{flops} {rate:>13s} {ms}{over}")
    if not lines:
        return ""
    head = (f"{'fused LM head':52s} {'impl':30s} {'median ms':>10s} {'x GEMMs':>9s} "
            f"{'FLOPs':>12s} {'rate':>13s} {'peak extra':>13s} {'x goal':>8s}")
    note = ("x GEMMs: median / the same run's bare products of the same shapes (their count "
            "after the x; * timed just before the row); x goal: peak extra beyond the returned "
            "gradients / (one chunk's logits + 5% of the full logits)")
    return "\n".join([head, *lines, note])
