"""Fused-LM-head rows against the same run's bare GEMMs (CPU included), the frozen-head workload,
the goal preset (``fastdpo bench --preset lmhead-goals``) with its per-row limits, and the memory
budget it is judged against. Tiny shapes only: the goal shapes are the lead's final run."""

import dataclasses
import json

import pytest
import torch

from fastdpo.bench import ceilings, impls, jobs, limits, lmhead, machine, memory, presets, runner
from fastdpo.bench import workloads
from fastdpo.bench.workloads import Case

TINY = ((64, 16, 300), (128, 32, 700))  # (N, H, V)


def _tiny(**kw):
    return presets.lmhead_goals(shapes=TINY, seq=16, **kw)


def test_gemm_count_of_each_linear_workload():
    N, H, V = 8, 4, 10
    fb = Case("linear_fwd_bwd", V, N, hidden=H)
    frozen = Case("linear_frozen_fwd_bwd", V, N, hidden=H)
    dpo = Case("linear_dpo_step", V, N, batch=2, hidden=H)
    assert frozen.gemms() == ((N, V, H), (N, H, V))  # logits, d_hidden: no d_weight
    assert len(fb.gemms()) == 3 and len(dpo.gemms()) == 4  # + the reference forward
    assert frozen.flops() == 2 * (2 * N * V * H) and dpo.flops() == 4 * (2 * N * V * H)
    assert frozen.kind == "linear" and frozen.frozen_head and not fb.frozen_head


def test_frozen_head_step_differentiates_the_hidden_states_only():
    case = Case("linear_frozen_fwd_bwd", 300, 32, batch=2, hidden=16)
    grads = {}
    for name in ("eager", "fastdpo[native]", "fastdpo[torch]"):
        impl = impls.by_name([name])[0]
        if impl.unavailable("cpu"):
            pytest.fail(f"{name} must run here: {impl.unavailable('cpu')}")
        step = workloads.build_step(case, impl, "cpu")
        state = step.setup()
        assert not state["weight"].requires_grad and state["hidden"].requires_grad
        (grads[name],) = step.run(state)
        assert state["weight"].grad is None
    ref = grads.pop("eager")
    assert ref.shape == (2, 16, 16) and ref.abs().sum() > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5, msg=name)


def test_lean_row_streams_the_pairs_and_agrees(monkeypatch):
    """fastdpo[native,lean] holds one planned chunk: its pair (over that) is streamed through
    the kept chunks in slabs of at most that many rows, with fastdpo[native]'s gradients."""
    from fastdpo.autograd import linear_loss as AL

    case = Case("linear_dpo_step", 32000, 512, batch=2, hidden=16)  # pairs: 256 rows > 131
    calls = []
    real = AL.stream_unit
    monkeypatch.setattr(AL, "stream_unit",
                        lambda *a, **k: calls.append(a[6]) or real(*a, **k))  # slab
    grads = {}
    for name in ("fastdpo[native]", "fastdpo[native,lean]"):
        step = workloads.build_step(case, impls.by_name([name])[0], "cpu")
        grads[name] = step.run(step.setup())
    assert calls == [131]  # the lean row only, in slabs of its planned chunk
    for a, b in zip(*grads.values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_workspace_row_keeps_its_buffer_between_repeats(kept_buffers):
    """fastdpo[native,workspace] passes one Workspace to every repeat of a case: the kept
    chunk's buffer is the same memory each step, and the gradients are fastdpo[native]'s bits."""
    case = Case("linear_dpo_step", 700, 128, batch=2, hidden=16)
    ptrs = kept_buffers
    grads = {}
    for name in ("fastdpo[native]", "fastdpo[native,workspace]"):
        step = workloads.build_step(case, impls.by_name([name])[0], "cpu")
        ptrs.clear()
        grads[name] = [step.run(step.setup()) for _ in range(3)]
        if name.endswith("workspace]"):
            assert len(ptrs) == 3 and len(set(ptrs)) == 1
    for a, b in zip(grads["fastdpo[native]"][0], grads["fastdpo[native,workspace]"][2]):
        assert torch.equal(a, b)


def test_bare_gemms_are_timed_per_shape_and_shared_between_cases():
    ceil = ceilings.Ceilings("cpu", log=None, copy_bytes=1 << 20, gemm_repeats=2)
    dpo = Case("linear_dpo_step", 300, 64, batch=2, hidden=16)
    frozen = Case("linear_frozen_fwd_bwd", 300, 64, batch=2, hidden=16)
    g = ceil.gemm_for(dpo)
    assert g["n_gemms"] == 4 and len(ceil.products) == 3  # the reference forward reuses one
    assert g["median_s"] == pytest.approx(sum(p["median_s"] for p in g["products"]))
    assert g["gflops"] == pytest.approx(dpo.flops() / g["median_s"] / 1e9)
    f = ceil.gemm_for(frozen)
    assert len(ceil.products) == 3  # both of the frozen head's products were timed already
    assert f["median_s"] == pytest.approx(sum(g["products"][i]["median_s"] for i in (0, 1)))


def test_cpu_linear_rows_are_multiples_of_the_same_runs_gemms():
    p = _tiny(row_limit_s=None)
    ceil = ceilings.Ceilings("cpu", log=None, copy_bytes=1 << 20, gemm_repeats=2)
    lines = []
    rows = runner.run_preset(p, impls.by_name(["eager", "fastdpo[native]"]), "cpu",
                             log=lines.append, ceiling=ceil)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 2 * len(p.cases), rows
    for r in ok:
        case = Case(**{k: r[k] for k in ("workload", "vocab", "tokens", "dtype", "batch",
                                         "hidden", "beta", "seed")})
        g = ceil.gemm_for(case)
        assert r["n_gemms"] == (4 if case.kind == "linear_dpo" else 2)
        assert r["flops"] == case.flops()
        # the goal preset times each row's GEMMs again just before it; the run's figure stays
        assert r["gemm_basis"] == "adjacent" and r["gemm_run_s"] == g["median_s"]
        assert r["x_gemm"] == pytest.approx(r["median_s"] / r["gemm_s"])
        assert r["gflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e9)
    assert any("bare GEMMs" in ln and "GFLOP/s" in ln for ln in lines)
    text = lmhead.table(rows)
    assert "x GEMMs" in text.splitlines()[0]
    assert sum(1 for ln in text.splitlines() if "linear_frozen_fwd_bwd" in ln) == 2 * len(TINY)


def test_heavy_rows_take_the_gemms_timed_beside_them(monkeypatch):
    """A heavy row (one timed repeat) is set against its bare products timed again just before
    it, not the run's figure from minutes earlier (the machine drifts by as much as the ratio
    measures); without ``adjacent_gemms`` the other rows keep the run's."""
    heavy = 5e6  # between the TINY cases' FLOPs: the larger shape's two cases are heavy
    p = dataclasses.replace(_tiny(row_limit_s=None, heavy_flops=heavy), adjacent_gemms=False)
    ceil = ceilings.Ceilings("cpu", log=None, copy_bytes=1 << 20, gemm_repeats=1)
    seen, near = [], []  # near: the adjacent figures, in row order
    real_adjacent, real_build = ceilings.Ceilings.adjacent, runner.build_step

    def adjacent(self, case):
        g = dict(real_adjacent(self, case))
        g["median_s"] *= 1000.0  # a figure no other basis has
        seen.append(("gemms", case))
        near.append(g["median_s"])
        return g

    def build(case, impl, device, **kw):
        seen.append(("step", case))
        return real_build(case, impl, device, **kw)

    monkeypatch.setattr(ceilings.Ceilings, "adjacent", adjacent)
    monkeypatch.setattr(runner, "build_step", build)
    rows = runner.run_preset(p, impls.by_name(["eager", "fastdpo[native]"]), "cpu", log=None,
                             ceiling=ceil)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 2 * len(p.cases), rows
    n_heavy = 0
    for r in ok:
        case = Case(**{k: r[k] for k in ("workload", "vocab", "tokens", "dtype", "batch",
                                         "hidden", "beta", "seed")})
        assert r["x_gemm"] == pytest.approx(r["median_s"] / r["gemm_s"])
        if case.flops() > heavy:
            assert r["gemm_basis"] == "adjacent" and r["gemm_s"] == near[n_heavy]
            assert r["gemm_run_s"] == ceil.gemm_for(case)["median_s"]
            n_heavy += 1
        else:
            assert r["gemm_basis"] == "run" and "gemm_run_s" not in r
            assert r["gemm_s"] == ceil.gemm_for(case)["median_s"]
    assert n_heavy == 2 * 2  # two heavy cases, two implementations
    steps = [i for i, e in enumerate(seen) if e[0] == "step" and e[1].flops() > heavy]
    assert len(steps) == n_heavy and all(seen[i - 1] == ("gemms", seen[i][1]) for i in steps)
    assert sum(1 for e in seen if e[0] == "gemms") == n_heavy
    marked = [ln for ln in lmhead.table(rows).splitlines() if "x 4*" in ln or "x 2*" in ln]
    assert len(marked) == n_heavy


def test_goal_preset_shapes_peers_and_limits():
    p = presets.preset("lmhead-goals", "cpu")
    shapes = {(c.tokens, c.hidden, c.vocab) for c in p.cases}
    assert shapes == {(1024, 512, 32000), (2048, 256, 128256), (4096, 1024, 128256)}
    assert [c.workload for c in p.cases[:2]] == ["linear_dpo_step", "linear_frozen_fwd_bwd"]
    assert [c.tokens for c in p.cases] == sorted(c.tokens for c in p.cases)  # big shape last
    assert all(c.dtype == "float32" and c.batch % 2 == 0 for c in p.cases)
    assert set(p.memory_cases) == set(p.cases) and p.memory_workers == 1
    assert p.row_limit_s == presets.LMHEAD_ROW_LIMIT_S and p.files == "lmhead-goals"
    peers = {"fastdpo[native]", "eager", "torch.compile", "cce[torch_compile]",
             "liger.fused_linear_dpo", "trl.chunked_logprob"}
    assert peers <= set(p.impls)
    big = max(p.cases, key=lambda c: c.flops())
    assert big.gemms()[0] == (4096, 128256, 1024) and big.flops() / 4 > 1e12  # ~1 TFLOP a GEMM
    eager, comp = impls.by_name(["eager", "torch.compile"])
    assert p.runs_for(big, eager) == (0, 1)  # one repeat, no warm-up
    assert p.runs_for(big, comp) == (1, 1)  # the warm-up compiles
    small = min(p.cases, key=lambda c: c.flops())
    assert p.runs_for(small, eager) == (p.warmup, p.repeats)
    assert presets.preset("quick", "cpu").row_limit_s is None  # not in --quick
    assert not any(c.tokens >= 1024 and c.kind != "logits" and c.hidden >= 512
                   for c in presets.preset("quick", "cpu").cases)


def test_quick_preset_has_the_frozen_head_and_no_goal_shape():
    q = presets.preset("quick", "cpu")
    frozen = [c for c in q.cases if c.workload == "linear_frozen_fwd_bwd"]
    assert len(frozen) == 1 and frozen[0].flops() < 1e10


def test_rows_predicted_past_the_row_limit_or_memory_are_skipped_and_said():
    p = _tiny(row_limit_s=1e-9)
    ceil = ceilings.Ceilings("cpu", log=None, copy_bytes=1 << 20, gemm_repeats=1)
    lines = []
    rows = runner.run_preset(p, impls.by_name(["eager", "fastdpo[native]"]), "cpu",
                             log=lines.append, ceiling=ceil)
    assert rows and all(r["status"] == "skipped" for r in rows)
    assert all("exceeds the row limit of 1e-09 s" in r["reason"] and "GEMMs assumed" in r["reason"]
               for r in rows)
    assert sum("exceeds the row limit" in ln for ln in lines) == len(rows)  # every one said
    case = p.cases[0]
    eager = impls.by_name(["eager"])[0]
    lim = limits.RowLimits(None, ceil, "cpu", memory_bytes=1000)
    assert "exceeds 85% of the" in lim.skip_reason(case, eager, 1, 1)
    lim = limits.RowLimits(10.0, ceil, "cpu", memory_bytes=1 << 40)
    assert lim.skip_reason(case, eager, 1, 1) == ""
    # a measured multiple replaces the prior for the next case of the same workload
    lim.observe({"status": "ok", "impl": "eager", "workload": case.workload, "x_gemm": 7.0,
                 "wall_s": 11.0})
    t, how = lim.predicted_s(case, eager, 0, 1)
    assert t == pytest.approx(7.0 * ceil.gemm_for(case)["median_s"]) and "measured" in how
    row = {"status": "ok", "impl": "eager", "workload": case.workload, "wall_s": 11.0}
    lim.observe(row)
    assert row["over_row_limit"]


def test_goal_budget_is_one_chunk_plus_five_percent():
    from fastdpo.autograd.linear_loss import plan_rows

    case = Case("linear_dpo_step", 128256, 4096, batch=8, hidden=1024)
    rows = plan_rows(4096, 128256, 4, False)
    assert lmhead.chunk_logits_bytes(case) == rows * 128256 * 4
    full = 4096 * 128256 * 4
    assert lmhead.goal_budget_bytes(case) == int(rows * 128256 * 4 + 0.05 * full)
    grads = 4 * (4096 * 1024 + 128256 * 1024)
    assert limits.grads_bytes(case) == grads
    frozen = Case("linear_frozen_fwd_bwd", 128256, 4096, batch=8, hidden=1024)
    assert limits.grads_bytes(frozen) == 4 * 4096 * 1024
    got = lmhead.relate_memory({"status": "ok", "peak_extra_bytes": grads + 1000}, case)
    assert got["scratch_bytes"] == 1000
    assert got["scratch_x_goal_budget"] == pytest.approx(1000 / lmhead.goal_budget_bytes(case))


def test_goal_preset_end_to_end_with_memory_and_busy(tmp_path, monkeypatch):
    """The preset as ``fastdpo bench --preset lmhead-goals --busy 1`` runs it, at one tiny shape:
    timed rows with GEMM multiples, isolated memory rows against the goal budget, the summary
    table, its own result files (bench-latest stays the quick run's)."""
    tiny = presets.lmhead_goals(shapes=TINY[:1], seq=16, row_limit_s=120.0)
    tiny = dataclasses.replace(tiny, cases=tiny.cases[1:], memory_cases=tiny.cases[1:])  # frozen
    monkeypatch.setattr(jobs, "preset", lambda name, device: tiny)
    lines = []
    with machine.competing_load(1):
        obj = jobs.bench_job("lmhead-goals", "cpu", tmp_path, impls="eager,fastdpo[native]",
                             log=lines.append)
    names = {f.name for f in tmp_path.iterdir()}
    assert {"lmhead-goals-latest.json", "lmhead-goals-latest.csv",
            "lmhead-goals-memory-latest.json", "lmhead-goals-table-latest.txt"} <= names
    assert "bench-latest.json" not in names
    saved = json.loads((tmp_path / "lmhead-goals-latest.json").read_text())
    assert saved["machine"]["competing_processes"] == 1 and saved["row_limit_s"] == 120.0
    ok = [r for r in saved["rows"] if r["status"] == "ok"]
    assert {r["impl"] for r in ok} == {"eager", "fastdpo[native]"}
    assert all(r["n_gemms"] == 2 and r["x_gemm"] > 0 and r["gflops"] > 0 for r in ok)
    mem = [r for r in obj["memory"]["rows"] if r["status"] == "ok"]
    assert {r["impl"] for r in mem} == {"eager", "fastdpo[native]"}
    assert all("scratch_x_goal_budget" in r and r["goal_budget_bytes"] > 0 for r in mem)
    table = (tmp_path / "lmhead-goals-table-latest.txt").read_text()
    assert "x goal" in table and table.count("linear_frozen_fwd_bwd") == 2
    assert any(ln.startswith("fastdpo bench --preset lmhead-goals") for ln in lines)


def test_memory_child_can_warm_up_on_a_small_case():
    case = Case("linear_frozen_fwd_bwd", 2000, 256, batch=4, hidden=32)
    small = memory.small_version(case)
    assert (small.workload, small.batch, small.hidden) == (case.workload, 4, 32)
    assert small.tokens == 64 and small.vocab == 1024
    got = memory.measure_case(case, impls.by_name(["eager"])[0], "cpu", saved=False,
                              small_warmup=True)
    assert got["warmup"] == "small case" and got["peak_extra_bytes"] >= 0


def test_memory_profile_says_why_a_pair_is_skipped():
    case = Case("linear_frozen_fwd_bwd", 300, 32, batch=2, hidden=16)
    rows = memory.profile([case], impls.by_name(["eager"]), "cpu", log=None,
                          skip_why=lambda i, c: "predicted 900 s exceeds the row limit")
    assert [(r["impl"], r["status"], r["reason"]) for r in rows] == [
        ("eager", "skipped", "predicted 900 s exceeds the row limit")]
    assert "memory skipped: predicted 900 s" in lmhead.table(
        [{**case.to_dict(), "impl": "eager", "status": "skipped", "reason": "r"}], rows)


def test_cli_selects_the_goal_preset_with_a_row_limit_and_busy():
    import argparse

    from fastdpo.cli import bench as cli

    ap = argparse.ArgumentParser()
    cli.add_arguments(ap)
    args = ap.parse_args(["--preset", "lmhead-goals", "--row-limit", "300", "--busy", "1"])
    assert (args.preset, args.row_limit, args.busy) == ("lmhead-goals", 300.0, 1)
    assert ap.parse_args([]).preset == "quick" and ap.parse_args([]).row_limit is None
    with pytest.raises(SystemExit):
        ap.parse_args(["--quick", "--preset", "lmhead-goals"])  # one preset at a time


def test_impl_lists_keep_bracketed_commas():
    """``--impl`` splits on the commas between names, not inside ``fastdpo[native,lean]``."""
    assert impls.split_names("fastdpo[native],fastdpo[native,lean], eager") == [
        "fastdpo[native]", "fastdpo[native,lean]", "eager"]
    assert [i.name for i in jobs._impls("fastdpo[native,lean],eager")] == [
        "fastdpo[native,lean]", "eager"]
