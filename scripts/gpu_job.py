"""The GPU machine's job, offline, in stages: ``bash scripts/run gpu [--dry-run]``.

Runs on the machine's own ``python3`` (its torch, triton, transformers) and downloads nothing:

  env      a venv that sees python3's packages (``.venv-gpu``); versions, GPU, nvcc
  peers    ``.whl/*.whl`` (from ``bash scripts/run gpu-wheels``) installed with ``--no-index``;
           which of TRL, Liger, Cut Cross-Entropy are importable, and which are missing
  build    ``pip install -e .`` with ``FASTDPO_FORCE_CUDA=1``, all cores, ``FASTDPO_CUDA_ARCHS=90``
           on an sm_90 device; the native CUDA kernels must load
  tests    the whole suite on CUDA, every backend required, ``pytest -n`` when xdist is there
  bench    ``fastdpo bench --gpu --device cuda`` with a time limit (most important cases first)

Each stage's outcome and time are recorded and the job goes on after a failure; every stage has a
timeout inside one overall budget (8 minutes on one H200, build included). Results go to ``$OUT``
when set (at most 8 files: the log, the summary, bench and memory JSON/CSV/PNG), else to
``benchmarks/results/gpu-<UTC time>/``. The summary (stage: pass/fail/time) is printed last.

``--dry-run``: every stage on CPU at tiny sizes, no CUDA build (CI runs this through
``tests/scripts``) so the job cannot rot between GPU runs. Standard library only: it runs before
anything is installed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = {"trl": "trl", "liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}
# Seconds: the whole job, then each stage's ceiling inside what is left of it.
BUDGET_S = 470
STAGE_MAX_S = {"env": 40, "peers": 60, "build": 150, "tests": 150, "bench": 300}
# Kept for later stages when an earlier one may run to its ceiling: the bench needs at least this.
BENCH_MIN_S = 110
# The bench stops starting measurements this long before its stage timeout (writing reports, the
# pair in flight, interpreter start).
BENCH_MARGIN_S = 35
OUT_FILES = ("gpu-job.log", "gpu-summary.json", "bench.json", "bench.csv", "bench.png",
             "memory.json", "memory.csv", "memory.png")
LOG_LIMIT = 15 << 20


class Job:
    def __init__(self, out: Path, work: Path, dry: bool, budget: float):
        self.out, self.work, self.dry, self.budget = out, work, dry, budget
        self.t0 = time.monotonic()
        self.stages: list[dict] = []
        self.facts: dict = {}
        work.mkdir(parents=True, exist_ok=True)
        self.log_path = work / "gpu-job.log"
        self.log_file = self.log_path.open("w")

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def run(self, cmd, timeout: float, env=None) -> tuple[int | None, str]:
        """Run ``cmd``, its output streamed to the console and the log; ``None`` on timeout
        (the whole process group is killed)."""
        self.say("$ " + " ".join(str(c) for c in cmd))
        p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, errors="replace",
                             start_new_session=True)
        tail: list[str] = []

        def pump():
            for line in p.stdout:
                line = line.rstrip("\n")
                self.say(line)
                tail.append(line)
                del tail[:-200]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = p.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = None
        reader.join(timeout=10)
        return rc, "\n".join(tail)

    def stage(self, name: str, fn, ceiling: float) -> dict:
        timeout = max(5.0, min(ceiling, self.left()))
        self.say(f"\n===== stage {name} (timeout {timeout:.0f} s, {self.left():.0f} s of the "
                 f"job's budget left) =====")
        t = time.monotonic()
        try:
            status, note = fn(timeout)
        except Exception as exc:  # noqa: BLE001 - a broken stage is recorded, the job goes on
            status, note = "fail", f"{type(exc).__name__}: {exc}"
        rec = {"stage": name, "status": status, "seconds": round(time.monotonic() - t, 1),
               "timeout_s": round(timeout), "note": note}
        self.stages.append(rec)
        self.say(f"===== {name}: {status} in {rec['seconds']:.0f} s{': ' + note if note else ''}")
        return rec


# ---------------------------------------------------------------- stages


def site_dirs(python: str) -> list[str]:
    """Where ``python`` finds its packages (its venv's or the system's site-packages)."""
    code = ("import json, site, sys; d = site.getsitepackages() + [site.getusersitepackages()]; "
            "print(json.dumps([p for p in sys.path if p.endswith(('site-packages', "
            "'dist-packages'))] + d))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return [p for p in dict.fromkeys(json.loads(out.stdout)) if os.path.isdir(p)]


def make_venv(base: str, venv: Path) -> Path:
    """A venv whose interpreter sees ``base``'s packages. ``--system-site-packages`` alone is not
    enough when ``base`` is itself a venv (the new one would see the system's, not base's), so
    a ``.pth`` file adds base's site directories (and runs their own ``.pth`` files)."""
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([base, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                       check=True)
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    sp = subprocess.run([str(py), "-c", code], capture_output=True, text=True,
                        check=True).stdout.strip()
    lines = [f"import site; site.addsitedir({d!r})" for d in site_dirs(base)]
    Path(sp, "_fastdpo_gpu_base.pth").write_text("\n".join(lines) + "\n")
    return py


PROBE = r"""
import importlib.metadata as md, importlib.util, json, os, platform, shutil, subprocess, sys
info = {"python": platform.python_version(), "executable": sys.executable, "cpus": os.cpu_count()}
dists = {"xdist": "pytest-xdist", "pytest_timeout": "pytest-timeout",
         "liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}
for m in ("torch", "triton", "transformers", "numpy", "pytest", "xdist", "pytest_timeout",
          "hypothesis", "matplotlib", "trl", "liger_kernel", "cut_cross_entropy"):
    try:  # metadata, not import: importing the peers is the peers stage's business
        info[m] = md.version(dists.get(m, m)) if importlib.util.find_spec(m) else None
    except md.PackageNotFoundError:
        info[m] = "present"
import torch
info["torch"] = torch.__version__
info["cuda_available"] = torch.cuda.is_available()
info["torch_cuda"] = torch.version.cuda
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = p.name
    info["capability"] = [p.major, p.minor]
    info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)),
                                    None)
if nvcc:
    v = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    info["nvcc"] = (v.strip().splitlines() or ["?"])[-1]
print("PROBE " + json.dumps(info))
"""


def stage_env(job: Job, args) -> callable:
    def run(timeout):
        fallback = ""
        try:
            job.py = make_venv(args.python, args.venv)
        except (OSError, subprocess.CalledProcessError) as exc:  # no venv module, say
            job.py = Path(args.python)
            fallback = f"; no venv ({type(exc).__name__}): installing into {args.python} itself"
        rc, tail = job.run([job.py, "-c", PROBE], timeout)
        line = [ln for ln in tail.splitlines() if ln.startswith("PROBE ")]
        if rc != 0 or not line:
            return "fail", f"the venv's python cannot import torch (exit {rc})"
        job.facts = json.loads(line[-1][6:])
        f = job.facts
        note = (f"python {f['python']}, torch {f['torch']} (CUDA {f['torch_cuda']}), triton "
                f"{f['triton']}, {f.get('gpu') or 'no GPU'}, {f['cpus']} CPUs{fallback}")
        if not job.dry and not f["cuda_available"]:
            return "fail", note + ": torch sees no CUDA device"
        return "pass", note
    return run


def stage_peers(job: Job, args) -> callable:
    def run(timeout):
        wheels = sorted((ROOT / ".whl").glob("*.whl"))
        notes = []
        status = "pass"
        pip = [job.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check"]
        if wheels and job.dry:  # this python need not be the GPU's 3.12: check, install nothing
            rc, _ = job.run([*pip, "--dry-run", "--target", job.work / "whl-check",
                             "--only-binary=:all:", "--python-version", "3.12", "--implementation",
                             "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                             "manylinux2014_x86_64", *wheels], timeout)
            if rc != 0:
                status = "fail"
            notes.append(f"{len(wheels)} wheels in .whl/ " + (
                "would install on cp312 manylinux" if rc == 0 else f"do not install (exit {rc})"))
        elif wheels:
            rc, _ = job.run([*pip, *wheels], timeout)
            if rc != 0:
                status = "fail"
                notes.append(f"pip install of {len(wheels)} wheels from .whl/ failed (exit {rc})")
            else:
                notes.append(f"installed {len(wheels)} wheels from .whl/")
        else:
            notes.append("no .whl/ (make it with `bash scripts/run gpu-wheels` where a registry "
                         "is reachable)")
        check = ("import importlib, json\nres = {}\nfor m in %r:\n    try:\n"
                 "        importlib.import_module(m); res[m] = ''\n    except Exception as e:\n"
                 "        res[m] = type(e).__name__ + ': ' + str(e)[:200]\n"
                 "print('PEERS ' + json.dumps(res))" % (list(PEERS),))
        rc, tail = job.run([job.py, "-c", check], max(5, timeout / 2))
        line = [ln for ln in tail.splitlines() if ln.startswith("PEERS ")]
        peers = json.loads(line[-1][6:]) if line else {}
        job.facts["peers"] = peers
        missing = [f"{PEERS[m]} ({why})" for m, why in peers.items() if why]
        notes.append("peers missing: " + "; ".join(missing) if missing else
                     "peers importable: " + ", ".join(PEERS.values()))
        return status, "; ".join(notes)
    return run


def stage_build(job: Job, args) -> callable:
    def run(timeout):
        if job.dry:
            return "skipped", "dry run: no CUDA build (the source tree's extension is used)"
        env = dict(os.environ, FASTDPO_FORCE_CUDA="1", MAX_JOBS=str(os.cpu_count() or 1))
        if job.facts.get("capability") == [9, 0]:
            env["FASTDPO_CUDA_ARCHS"] = "90"
        rc, _ = job.run([job.py, "-m", "pip", "install", "--no-index", "--no-deps",
                         "--no-build-isolation", "--no-cache-dir", "--disable-pip-version-check",
                         "-e", "."], timeout, env=env)
        if rc is None:
            return "fail", "timed out"
        if rc != 0:
            return "fail", f"pip install -e . exit {rc}"
        probe = ("import fastdpo.native.register as r; import torch; "
                 "assert r.HAS_CUDA, 'the native extension has no CUDA kernels'; "
                 "print('native CUDA kernels loaded')")
        rc, tail = job.run([job.py, "-c", probe], 60)
        if rc != 0:
            return "fail", "built, but the native CUDA kernels do not load: " + tail[-300:]
        return "pass", f"FASTDPO_CUDA_ARCHS={env.get('FASTDPO_CUDA_ARCHS', 'default')}"
    return run


def _pytest_counts(tail: str) -> str:
    lines = [ln for ln in tail.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return lines[-1].strip("= ") if lines else ""


def stage_tests(job: Job, args) -> callable:
    def run(timeout):
        cmd = [job.py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--require-backends",
               "all", "-o", "addopts=-ra"]
        if job.facts.get("xdist"):
            n = min(16, job.facts.get("cpus") or 1) if not job.dry else 2
            cmd += ["-n", str(n)]
        if job.facts.get("pytest_timeout"):
            cmd += ["--timeout", "90"]  # one hung test fails alone, not the whole stage
        # tests/scripts is this job's own dry run: CI's business, not the GPU's.
        cmd += ["tests", "--ignore", "tests/scripts"] if not job.dry else ["tests/cli/test_info.py"]
        rc, tail = job.run(cmd, timeout)
        counts = _pytest_counts(tail)
        if rc is None:
            return "fail", f"timed out after {timeout:.0f} s ({counts or 'no summary'})"
        return ("pass" if rc == 0 else "fail"), counts or f"pytest exit {rc}"
    return run


def stage_bench(job: Job, args) -> callable:
    def run(timeout):
        out = job.work / "bench"
        limit = max(10.0, timeout - BENCH_MARGIN_S)
        cmd = [job.py, "-m", "fastdpo.cli.main", "bench", "--gpu", "--out", out,
               "--time-limit", f"{limit:.0f}"]
        if job.dry:
            cmd += ["--device", "cpu", "--impl", "fastdpo[torch],eager"]
        else:
            cmd += ["--device", "cuda"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        rc, tail = job.run(cmd, timeout, env=env)
        res = job.work / "bench" / "bench-latest.json"
        if rc is None:
            part = out / "bench-partial.jsonl"
            n = len(part.read_text().splitlines()) if part.exists() else 0
            return "fail", f"timed out; {n} rows kept in bench-partial.jsonl"
        if rc != 0 or not res.exists():
            return "fail", f"fastdpo bench exit {rc}"
        b = json.loads(res.read_text())
        ok = sum(r.get("status") == "ok" for r in b["rows"])
        skipped = sum(r.get("status") == "skipped" for r in b["rows"])
        errors = [r for r in b["rows"] if r.get("status") == "error"]
        fast_errors = [r for r in errors if r.get("family") == "fastdpo"]
        note = (f"{ok} rows timed, {skipped} skipped, {len(errors)} errors "
                f"({len(fast_errors)} fastdpo); copy {b['ceilings']['copy']['gbps']:.0f} GB/s")
        for measure in ("copy_fraction", "x_gemm"):
            g = [x for x in b.get("goals", []) if x["measure"] == measure]
            if g:
                vals = sorted(x["value"] for x in g)
                note += (f"; {measure} {vals[0]:.2f}..{vals[-1]:.2f} (goal {g[0]['goal']}: "
                         f"{sum(x['met'] for x in g)}/{len(g)} met)")
        for r in fast_errors[:3]:
            note += f"; ERROR {r['impl']} {r['workload']} V={r['vocab']}: {r['reason'][:120]}"
        return ("fail" if fast_errors else "pass"), note
    return run


# ---------------------------------------------------------------- results


def collect(job: Job) -> list[Path]:
    """Copy the results that travel back (at most 8 files, each under 16 MiB) to ``job.out``."""
    job.out.mkdir(parents=True, exist_ok=True)
    bench = job.work / "bench"
    picks = {"bench.json": bench / "bench-latest.json", "bench.csv": bench / "bench-latest.csv",
             "bench.png": bench / "bench-latest.png", "memory.json": bench / "memory-latest.json",
             "memory.csv": bench / "memory-latest.csv", "memory.png": bench / "memory-latest.png"}
    if not picks["bench.json"].exists() and (bench / "bench-partial.jsonl").exists():
        picks["bench.json"] = bench / "bench-partial.jsonl"
    copied = []
    for name, src in picks.items():
        if src.exists() and src.resolve() != (job.out / name).resolve():
            shutil.copyfile(src, job.out / name)
            copied.append(job.out / name)
    return copied


def summary(job: Job, copied) -> None:
    total = time.monotonic() - job.t0
    obj = {"dry_run": job.dry, "total_s": round(total, 1), "budget_s": job.budget,
           "stages": job.stages, "facts": job.facts,
           "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    (job.out / "gpu-summary.json").write_text(json.dumps(obj, indent=1))
    job.say("\n===== summary " + ("(dry run on CPU) " if job.dry else "") + "=====")
    for s in job.stages:
        job.say(f"  {s['stage']:6s} {s['status']:7s} {s['seconds']:6.0f} s  {s['note']}")
    job.say(f"  total  {total:.0f} s of a {job.budget:.0f} s budget; results in {job.out}")
    if copied:
        job.say("  files: " + ", ".join(p.name for p in copied) + ", gpu-summary.json, gpu-job.log")
    job.log_file.close()
    log_dst = job.out / "gpu-job.log"
    if job.log_path.resolve() != log_dst.resolve():
        data = job.log_path.read_bytes()
        log_dst.write_bytes(data[-LOG_LIMIT:])


def default_out(dry: bool) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    ts = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return ROOT / "benchmarks" / "results" / f"gpu-{'dryrun-' if dry else ''}{ts}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/run gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="every stage on CPU at tiny sizes, no CUDA build")
    ap.add_argument("--out", type=Path, default=None, help="results (default: $OUT, else "
                    "benchmarks/results/gpu-<UTC time>)")
    ap.add_argument("--venv", type=Path, default=ROOT / ".venv-gpu")
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter whose packages the job uses (default: this one)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for the whole job (default {BUDGET_S}; dry run 150)")
    ap.add_argument("--only", default=None, metavar="STAGES",
                    help="comma list of stages to run after env (a rerun on a machine still "
                         "warm from the first: e.g. --only build,bench --budget 240)")
    args = ap.parse_args(argv)
    out = (args.out or default_out(args.dry_run)).resolve()
    budget = args.budget or (150 if args.dry_run else BUDGET_S)
    # Work files stay out of $OUT (only 8 files come back from there).
    in_out = os.environ.get("OUT") and out == Path(os.environ["OUT"]).resolve()
    work = ROOT / ".gpu-work" if in_out else out / "work"
    job = Job(out, work, args.dry_run, budget)
    job.py = Path(args.python)
    job.say(f"fastdpo GPU job{' (dry run on CPU)' if args.dry_run else ''}: budget "
            f"{budget:.0f} s, results to {out}")
    caps = dict(STAGE_MAX_S)
    if args.dry_run:
        caps.update(build=10, tests=60, bench=45)
    only = set(args.only.split(",")) if args.only else {"peers", "build", "tests", "bench"}
    later = BENCH_MIN_S if not args.dry_run and "bench" in only else 30
    job.stage("env", stage_env(job, args), caps["env"])
    if "peers" in only:
        job.stage("peers", stage_peers(job, args), caps["peers"])
    if "build" in only:
        tests_min = 60 if "tests" in only else 0
        job.stage("build", stage_build(job, args),
                  min(caps["build"], job.left() - later - tests_min))
    if "tests" in only:
        job.stage("tests", stage_tests(job, args), min(caps["tests"], job.left() - later))
    if "bench" in only:
        job.stage("bench", stage_bench(job, args), min(caps["bench"], job.left() - 5))
    summary(job, collect(job))
    return 0 if all(s["status"] != "fail" for s in job.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
