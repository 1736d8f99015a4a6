"""The benchmark harness: timing statistics, machine details, steps that compute the same thing
for every implementation, ratios, reasons for what can't run, and the report files."""

import csv
import json

import pytest
import torch

from fastdpo.bench import ceilings, impls, machine, presets, report, runner, timing, workloads
from fastdpo.bench.workloads import Case


def test_measure_rebuilds_state_untimed_and_excludes_warmup():
    calls = {"setup": 0, "step": 0}

    def setup():
        calls["setup"] += 1
        return calls["setup"]

    seen = []

    def step(state):
        calls["step"] += 1
        seen.append(state)

    t = timing.measure(step, setup=setup, warmup=2, repeats=5)
    assert calls == {"setup": 7, "step": 7}
    assert seen == [1, 2, 3, 4, 5, 6, 7]  # every call got fresh state
    assert t.repeats == 5 and t.warmup == 2 and len(t.samples_s) == 5
    assert t.clock == "perf_counter"
    assert t.min_s <= t.q25_s <= t.median_s <= t.q75_s <= t.max_s


def test_summary_statistics():
    t = timing.summarize([4.0, 1.0, 3.0, 2.0, 100.0], warmup=1, clock="perf_counter")
    assert t.median_s == 3.0 and t.q25_s == 2.0 and t.q75_s == 4.0
    assert t.min_s == 1.0 and t.max_s == 100.0
    assert t.iqr_rel == pytest.approx(2.0 / 3.0)


def test_machine_details():
    info = machine.machine_info()
    with open("/proc/cpuinfo") as f:
        models = {ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")}
    assert info["cpu_model"] in models
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["cpu_count"] >= 1 and info["versions"]["torch"] == torch.__version__
    assert info["versions"]["fastdpo"]
    assert machine.machine_tag(info).endswith(f"-{torch.get_num_threads()}t")


def _grad_of(impl_name, case):
    impl = impls.by_name([impl_name])[0]
    step = workloads.build_step(case, impl, "cpu")
    return step.run(step.setup())


@pytest.mark.parametrize("workload,batch", [("logps_fwd_bwd", 2), ("dpo_step", 4)])
def test_steps_of_fastdpo_and_eager_agree(workload, batch):
    case = Case(workload, vocab=1000, tokens=64, batch=batch)
    (g_eager,) = _grad_of("eager", case)
    (g_fast,) = _grad_of("fastdpo[torch]", case)  # in-place backward: the logits' own storage
    assert g_fast.shape == g_eager.shape == (batch, 64 // batch, 1000)
    torch.testing.assert_close(g_fast, g_eager, rtol=1e-4, atol=1e-6)
    assert g_eager.abs().sum() > 0


def test_forward_values_agree_and_reference_pass_builds_no_graph():
    case = Case("logps_ref", vocab=777, tokens=32, batch=2)
    outs = {}
    for name in ("eager", "fastdpo[torch]", "trl.selective_log_softmax"):
        impl = impls.by_name([name])[0]
        if impl.unavailable("cpu"):
            continue
        step = workloads.build_step(case, impl, "cpu")
        outs[name] = step.run(step.setup())
        assert not outs[name].requires_grad
    ref = outs.pop("eager")
    for name, out in outs.items():
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4, msg=name)


def test_labels_ignore_a_prompt_prefix():
    lab = workloads.make_labels(Case("logps_fwd", 50, 64, batch=2), "cpu")
    assert (lab[:, :4] == -100).all() and (lab[:, 4:] >= 0).all()


def test_triton_peers_on_cpu_say_why_and_are_not_timed(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even then: the interpreter is not timed
    for name in ("liger.cross_entropy", "liger.fused_linear_cross_entropy", "cce"):
        assert "needs GPU" in impls.by_name([name])[0].unavailable("cpu")
    assert "not timed" in impls.by_name(["fastdpo[triton]"])[0].unavailable("cpu")
    row = runner.time_case(Case("logps_fwd", 100, 8), impls.by_name(["liger.cross_entropy"])[0],
                           "cpu", warmup=0, repeats=1, max_seconds=None)
    assert row["status"] == "unavailable" and "needs GPU" in row["reason"]


def test_ratios_are_per_case():
    rows = [{"workload": "w", "vocab": 1, "tokens": 1, "dtype": "f", "batch": 1, "hidden": 0,
             "device": "cpu", "impl": name, "status": "ok", "median_s": t}
            for name, t in (("eager", 4.0), ("mine", 1.0))]
    rows.append({**rows[0], "vocab": 2, "impl": "mine", "median_s": 1.0})
    runner.add_ratios(rows)
    assert rows[1]["speedup_vs_eager"] == 4.0 and rows[0]["speedup_vs_mine"] == 0.25
    assert "speedup_vs_eager" not in rows[2]  # another case: nothing to compare with


def test_timed_sweep_and_report_files(tmp_path):
    case = Case("logps_fwd_bwd", vocab=500, tokens=16)
    rows = [runner.time_case(case, i, "cpu", warmup=1, repeats=3, max_seconds=None)
            for i in impls.by_name(["eager", "fastdpo[torch]"])]
    rows += [runner.time_case(Case("logps_fwd_bwd", vocab=700, tokens=16), i, "cpu", warmup=0,
                              repeats=2, max_seconds=None)
             for i in impls.by_name(["eager", "fastdpo[torch]"])]
    runner.add_ratios(rows)
    assert all(r["status"] == "ok" and r["repeats"] >= 2 for r in rows)
    assert rows[1]["speedup_vs_eager"] == pytest.approx(rows[0]["median_s"] / rows[1]["median_s"])
    info = machine.machine_info()
    tag, ts = machine.machine_tag(info), report.stamp(info)
    files = report.write_json({"machine": info, "rows": rows}, tmp_path, "bench", tag, ts)
    files += report.write_csv(rows, info, tmp_path, "bench", tag, ts)
    files += report.write_plot(rows, "median_s", "ms", "t", tmp_path, "bench", tag, ts, 1e3)
    names = {f.name for f in files}
    assert {"bench-latest.json", "bench-latest.csv", "bench-latest.png"} <= names
    assert json.loads((tmp_path / "bench-latest.json").read_text())["machine"]["cpu_model"]
    with open(tmp_path / "bench-latest.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 4 and got[0]["machine_cpu_model"] == info["cpu_model"]
    assert (tmp_path / "bench-latest.png").read_bytes()[:4] == b"\x89PNG"


def test_presets_hold_the_native_target():
    quick = presets.preset("quick", "cpu")
    assert quick.cases[0] == presets.NATIVE_TARGET
    t = presets.NATIVE_TARGET
    assert (t.workload, t.dtype, t.tokens, t.vocab) == ("logps_fwd_bwd", "float32", 2048, 128256)
    full = presets.preset("full", "cpu")
    assert {c.vocab for c in full.cases} == set(workloads.VOCABS)


def test_minimum_bytes_and_gemm_shapes_of_each_workload():
    c = Case("logps_fwd_bwd", vocab=100, tokens=8)
    assert c.logits_passes() == 3 and c.logits_bytes() == 8 * 100 * 4  # read, read, write
    assert Case("logps_ref", 100, 8).logits_passes() == 1
    assert Case("dpo_step", 100, 8, batch=2).logits_passes() == 4  # + the reference logits
    lin = Case("linear_fwd_bwd", vocab=100, tokens=8, hidden=16)
    assert lin.gemms() == ((8, 100, 16), (8, 16, 100), (100, 16, 8))
    assert lin.flops() == 6 * 8 * 100 * 16
    assert len(Case("linear_dpo_step", 100, 8, batch=2, hidden=16).gemms()) == 4
    assert c.gemms() == () and c.flops() == 0


def test_rows_relate_to_the_same_runs_ceilings():
    ceil = ceilings.Ceilings("cpu", log=None, copy_bytes=8 << 20)
    assert ceil.copy["gbps"] > 0 and ceil.copy["bytes"] == 8 << 20
    fb = Case("logps_fwd_bwd", vocab=1000, tokens=64)
    row = runner.time_case(fb, impls.by_name(["eager"])[0], "cpu", warmup=0, repeats=2,
                           max_seconds=None, ceiling=ceil)
    assert row["min_bytes"] == 3 * fb.logits_bytes()
    assert row["copy_fraction"] == pytest.approx(row["achieved_gbps"] / ceil.copy["gbps"])
    lin = Case("linear_fwd_bwd", vocab=300, tokens=32, hidden=16)
    row = runner.time_case(lin, impls.by_name(["eager"])[0], "cpu", warmup=0, repeats=2,
                           max_seconds=None, ceiling=ceil)
    g = ceil.gemm_for(lin)
    assert row["x_gemm"] == pytest.approx(row["median_s"] / g["median_s"])
    assert row["flops"] == lin.flops() and row["tflops"] > 0
    got = ceilings.goals([{**row, "family": "fastdpo", "status": "ok", "x_gemm": 1.1}],
                         presets.GPU_GOALS)
    assert got[0]["measure"] == "x_gemm" and got[0]["met"]


def test_time_limit_skips_the_rest_and_says_why():
    p = presets.preset("gpu", "cpu")
    rows = runner.run_preset(p, impls.by_name(["eager"]), "cpu", log=None, deadline=0.0)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 1 and ok[0]["workload"] == p.cases[0].workload  # the first always runs
    assert all("time limit" in r["reason"] for r in rows if r["status"] == "skipped")


def test_native_target_summary_judges_the_goals():
    t = presets.NATIVE_TARGET
    base = {**t.to_dict(), "device": "cpu", "status": "ok"}
    rows = [{**base, "impl": n, "median_s": s} for n, s in
            (("fastdpo[native]", 1.0), ("eager", 9.0), ("torch.compile", 4.0),
             ("trl.selective_log_softmax", 3.5))]
    runner.add_ratios(rows)
    mem = [{**base, "impl": "fastdpo[native]", "peak_total_x_logits": 1.02,
            "peak_extra_x_logits": 0.02}]
    s = runner.native_target_summary(rows, mem, "cpu")
    assert s["status"] == "measured" and s["speedups"]["eager"] == 9.0
    assert s["met"] == {"speedup_vs_eager>=8.0": True, "speedup_vs_torch.compile>=5.0": False,
                        "speedup_vs_trl.selective_log_softmax>=3.0": True,
                        "peak_total_x_logits<=1.1": True}
