"""``bash scripts/run gpu --dry-run``: the GPU machine's job, every stage on CPU at tiny sizes, so
the job cannot rot between GPU runs. Run as on the GPU machine: results to ``$OUT``, where at most
8 plainly named files may be left (only those come back from that machine)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_job_dry_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    p = subprocess.run(["bash", "scripts/run", "gpu", "--dry-run", "--venv",
                        str(tmp_path / "venv")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    summary = json.loads((out / "gpu-summary.json").read_text())
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status == {"env": "pass", "peers": "pass", "build": "skipped", "tests": "pass",
                      "bench": "pass"}, summary["stages"]
    assert summary["dry_run"] and summary["total_s"] < summary["budget_s"]
    # The summary is the last thing printed: stage, status, time.
    tail = p.stdout.strip().splitlines()
    first = max(i for i, ln in enumerate(tail) if ln.startswith("===== summary"))
    assert [ln.split()[0] for ln in tail[first + 1:first + 6]] == list(status)
    files = sorted(f.name for f in out.iterdir())
    assert len(files) <= 8 and all(f.is_file() for f in out.iterdir()), files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    assert {"gpu-job.log", "gpu-summary.json", "bench.json", "bench.csv"} <= set(files)
    bench = json.loads((out / "bench.json").read_text())
    rows = [r for r in bench["rows"] if r["status"] == "ok"]
    assert rows and bench["ceilings"]["copy"]["gbps"] > 0
    logits = [r for r in rows if r["workload"].startswith("logps")]
    assert logits and all(0 < r["copy_fraction"] for r in logits)
    assert all(r["min_bytes"] == r["logits_bytes"] * (3 if r["workload"] == "logps_fwd_bwd" else 1)
               for r in logits)
    linear = [r for r in rows if r["workload"] == "linear_fwd_bwd"]
    for r in linear:
        assert r["x_gemm"] > 0 and r["flops"] == 6 * r["tokens"] * r["vocab"] * r["hidden"]
