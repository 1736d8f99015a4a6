"""``fastdpo bench`` end to end: optional dependencies missing are said and skipped, never a
traceback; the presets' shapes; the progress lines with their estimates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastdpo.bench import presets
from fastdpo.bench.workloads import VOCABS

ROOT = Path(__file__).resolve().parents[2]


def _bench(tmp_path, *args, shadow=()):
    """Run ``fastdpo bench`` in a fresh interpreter; ``shadow`` modules fail to import there."""
    fake = tmp_path / "shadow"
    for name in shadow:
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(
            f"raise ImportError({'No module named ' + repr(name)!r})")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(ROOT)]))
    out = tmp_path / "res"
    p = subprocess.run([sys.executable, "-m", "fastdpo.cli.main", "bench", *args, "--out",
                        str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    return p, out


def test_bench_without_matplotlib_writes_json_csv_and_exits_0(tmp_path):
    p, out = _bench(tmp_path, "--gpu", "--device", "cpu", "--impl", "eager,fastdpo[torch]",
                    "--time-limit", "6", shadow=("matplotlib",))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert p.stdout.count("plots skipped: matplotlib is not installed") == 2  # bench and memory
    names = {f.name for f in out.iterdir()}
    assert {"bench-latest.json", "bench-latest.csv", "memory-latest.json",
            "memory-latest.csv"} <= names
    assert not any(n.endswith(".png") for n in names)
    bench = json.loads((out / "bench-latest.json").read_text())
    assert any(r["status"] == "ok" for r in bench["rows"])
    # the time limit leaves the rest as skipped rows, said so
    assert all(r["status"] in ("ok", "skipped") for r in bench["rows"])
    assert "estimated" in p.stdout and "left]" in p.stdout  # progress with time estimates
    assert not (out / "bench-partial.jsonl").exists()  # a finished run leaves no partial file


def test_inspect_without_triton_says_so_and_exits_0(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = ("import importlib.util, sys; real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda n, *a: None if n == 'triton' else real(n, *a)\n"
            "from fastdpo.cli.main import main; sys.exit(main(['inspect', '--out', %r]))"
            % str(tmp_path))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "needs triton" in p.stdout


def test_gpu_preset_covers_the_issue_sizes_most_important_first():
    p = presets.preset("gpu", "cuda")
    logits = {(c.workload, c.vocab, c.tokens, c.dtype) for c in p.cases if c.kind == "logits"
              and c.workload != "dpo_step"}
    assert logits == {(w, v, n, d) for w in ("logps_fwd", "logps_fwd_bwd", "logps_ref")
                      for v in VOCABS for n in (4096, 16384) for d in ("bfloat16", "float32")}
    assert {c.hidden for c in p.cases if c.kind != "logits"} == {4096}
    assert {c.vocab for c in p.cases if c.workload == "linear_fwd_bwd"} == set(VOCABS)
    assert {"dpo_step", "linear_dpo_step"} <= {c.workload for c in p.cases}
    assert len(set(p.cases)) == len(p.cases)
    # every workload is in the first cases, so a time limit cuts the least important
    first = {c.workload for c in p.cases[:5]}
    assert {"logps_fwd_bwd", "logps_ref", "linear_fwd_bwd", "dpo_step",
            "linear_dpo_step"} <= first
    tiny = presets.preset("gpu", "cpu")
    assert max(c.logits_bytes() for c in tiny.cases) < 1 << 20


def test_quick_cpu_preset_keeps_the_headline_figures():
    q = presets.preset("quick", "cpu")
    assert q.cases[0] == presets.NATIVE_TARGET
    assert {"dpo_step", "linear_dpo_step", "logps_ref", "linear_fwd_bwd"} <= {
        c.workload for c in q.cases}
    assert q.memory_cases and q.has_native_target


def test_competing_load_runs_busy_processes_and_records_them():
    """``fastdpo bench --busy N``: N spinning processes live exactly while the bench runs, and the
    results say so (machine info and file tag)."""
    from fastdpo.bench import machine

    with machine.competing_load(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
        info = machine.machine_info()
        assert info["competing_processes"] == 2
        assert machine.machine_tag(info).endswith("-busy2")
    assert all(p.poll() is not None for p in procs)
    assert machine.machine_info()["competing_processes"] == 0
    with pytest.raises(ValueError, match="competing processes"):
        with machine.competing_load(-1):
            pass
