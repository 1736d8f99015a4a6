"""The paired busy-machine bench (``fastdpo bench --preset lmhead-busy``,
:mod:`fastdpo.bench.busy`): quiet and busy steps alternate in rounds, the competing processes
really run in the busy half only, and the verdict compares fastdpo's slowdown with eager's.
Tiny shapes, one or two rounds."""

import json

import pytest
import torch

from fastdpo.bench import busy, impls, jobs, machine, presets
from fastdpo.bench.workloads import Case

TINY = Case("linear_dpo_step", 300, 64, batch=2, hidden=16)


def _spy_load(monkeypatch):
    """Record how many competing processes ran around each timed step."""
    seen = []
    real_load, real_time = busy.competing_load, busy._time_once

    def load(n):
        seen.append(("start", n))
        return real_load(n)

    monkeypatch.setattr(busy, "competing_load", load)
    monkeypatch.setattr(busy, "_time_once", lambda step, threads: seen.append(
        ("step", machine._competing)) or real_time(step, threads))
    monkeypatch.setattr(busy, "SETTLE_S", 0.0)
    return seen


def test_rounds_alternate_quiet_and_busy_halves(monkeypatch):
    seen = _spy_load(monkeypatch)
    rows = busy.paired_case(TINY, impls.by_name(["fastdpo[native]", "eager"]), "cpu", rounds=2,
                            log=lambda *a: None)
    # per round: both implementations quiet, then the load, then both busy
    assert seen == [("step", 0), ("step", 0), ("start", 1), ("step", 1), ("step", 1)] * 2
    assert [r["impl"] for r in rows] == ["fastdpo[native]", "eager"]
    for r in rows:
        assert r["status"] == "ok" and r["rounds"] == 2 and r["busy_processes"] == 1
        assert len(r["quiet_s"]) == len(r["busy_s"]) == len(r["slowdowns"]) == 2
        assert all(q > 0 and b > 0 for q, b in zip(r["quiet_s"], r["busy_s"]))
        assert r["slowdowns"] == pytest.approx([b / q for q, b in zip(r["quiet_s"], r["busy_s"])])
        assert min(r["slowdowns"]) <= r["slowdown"] <= max(r["slowdowns"])
    assert machine._competing == 0  # the load is gone after the rounds


def _record_runs(monkeypatch, what=lambda name: name):
    """``what(impl name)`` of every step run (warm-up, quiet and busy), in order."""
    seen = []
    real = busy.build_step

    def build(case, impl, device):
        step = real(case, impl, device)
        run = step.run
        step.run = lambda s, _n=impl.name: seen.append(what(_n)) or run(s)
        return step

    monkeypatch.setattr(busy, "build_step", build)
    return seen


def test_order_rotates_between_rounds(monkeypatch):
    monkeypatch.setattr(busy, "SETTLE_S", 0.0)
    order = _record_runs(monkeypatch)
    busy.paired_case(TINY, impls.by_name(["fastdpo[native]", "eager"]), "cpu", rounds=2,
                     warmup=False, log=lambda *a: None)
    a, b = "fastdpo[native]", "eager"
    assert order == [a, b, a, b, b, a, b, a]


def test_compilers_warm_up_even_in_heavy_cases(monkeypatch):
    """A heavy case skips the warm-up, but a first call that compiles is never timed."""
    monkeypatch.setattr(busy, "SETTLE_S", 0.0)
    monkeypatch.setattr(busy, "COMPILES_FIRST_CALL", ("eager",))  # stands in for a compiler
    calls = _record_runs(monkeypatch)
    busy.paired_case(TINY, impls.by_name(["fastdpo[native]", "eager"]), "cpu", rounds=1,
                     warmup=False, log=lambda *a: None)
    assert calls.count("eager") == 3 and calls.count("fastdpo[native]") == 2
    assert calls[0] == "eager"  # the warm-up, before any timed call


def test_thread_variants_run_with_more_threads(monkeypatch):
    monkeypatch.setattr(busy, "SETTLE_S", 0.0)
    base = torch.get_num_threads()
    seen = _record_runs(monkeypatch, lambda n: (n, torch.get_num_threads()))
    rows = busy.paired_case(TINY, impls.by_name(["fastdpo[native]", "eager", "fastdpo[torch]"]),
                            "cpu", rounds=1, warmup=False, extra_threads=1, log=lambda *a: None)
    got = {(r["impl"], r["threads"]) for r in rows}
    assert got == {("fastdpo[native]", base), ("fastdpo[native] +1 threads", base + 1),
                   ("eager", base), ("eager +1 threads", base + 1), ("fastdpo[torch]", base),
                   ("fastdpo[torch] +1 threads", base + 1)}
    # each variant ran quiet and busy with its own thread count; the setting is restored
    names = ("fastdpo[native]", "eager", "fastdpo[torch]")
    assert sorted(seen) == sorted([(n, t) for n in names for t in (base, base + 1)] * 2)
    assert torch.get_num_threads() == base
    v = {x["impl"] for x in busy.verdicts(rows)}
    assert v == {"fastdpo[native]", "fastdpo[native] +1 threads", "fastdpo[torch]",
                 "fastdpo[torch] +1 threads"}  # each against eager at the machine's setting
    with pytest.raises(ValueError, match="extra_threads"):
        busy.paired_case(TINY, [], "cpu", rounds=1, extra_threads=-1)


def test_verdict_compares_with_eager_of_the_same_case():
    def row(impl, slowdown, tokens=64):
        return {"workload": "linear_dpo_step", "vocab": 300, "tokens": tokens, "hidden": 16,
                "dtype": "float32", "impl": impl, "status": "ok", "slowdown": slowdown}

    rows = [row("fastdpo[native]", 1.4), row("eager", 1.5), row("cce", 1.2),
            row("fastdpo[native]", 1.6, tokens=128), row("eager", 1.5, tokens=128)]
    v = busy.verdicts(rows)
    assert [(x["case"], x["met"]) for x in v] == [([64, 16, 300], True), ([128, 16, 300], False)]
    assert v[0]["eager_slowdown"] == 1.5
    # no eager row for a case: no verdict rather than a guess
    assert busy.verdicts([row("fastdpo[native]", 1.4)]) == []


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="rounds"):
        busy.paired_case(TINY, [], "cpu", rounds=0)
    with pytest.raises(ValueError, match="busy"):
        busy.paired_case(TINY, [], "cpu", rounds=1, busy=0)


def test_job_writes_rows_verdicts_and_table(tmp_path, monkeypatch):
    monkeypatch.setattr(busy, "SETTLE_S", 0.0)
    obj = jobs.busy_job("cpu", tmp_path, impls="fastdpo[native],eager", cases=[TINY], rounds=1,
                        extra_threads=0, log=lambda *a: None)
    saved = json.loads((tmp_path / "lmhead-busy-latest.json").read_text())
    assert saved["kind"] == "lmhead-busy" and saved["machine"]["cpu_count"]
    assert [r["impl"] for r in saved["rows"]] == ["fastdpo[native]", "eager"]
    assert len(saved["verdicts"]) == 1 and saved["verdicts"][0] == obj["verdicts"][0]
    table = (tmp_path / "lmhead-busy-table-latest.txt").read_text()
    assert "fastdpo[native]" in table and "eager's" in table
    assert (tmp_path / "lmhead-busy-latest.csv").read_text().count("\n") == 3  # header + 2 rows


def test_preset_cases_are_the_goal_dpo_steps():
    cases = presets.lmhead_busy_cases()
    assert [(c.tokens, c.hidden, c.vocab) for c in cases] == list(presets.LMHEAD_GOAL_SHAPES)
    assert {c.workload for c in cases} == {"linear_dpo_step"}
    assert [presets.busy_rounds(c) for c in cases] == [5, 5, 3]
    assert presets.LMHEAD_BUSY_IMPLS[0] == "fastdpo[native]"
    assert "eager" in presets.LMHEAD_BUSY_IMPLS


def test_cli_refuses_options_the_busy_job_ignores(capsys):
    from fastdpo.cli.main import main

    with pytest.raises(SystemExit, match="--workload"):
        main(["bench", "--preset", "lmhead-busy", "--workload", "linear_dpo_step"])
