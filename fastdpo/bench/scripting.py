"""What the one-workload scripts under ``benchmarks/`` share: a command line that runs and writes
one workload's sweep, and the pytest-benchmark glue (``benchmark.pedantic`` with untimed setup)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from . import report
from .ceilings import Ceilings
from .impls import by_name, split_names
from .machine import machine_info, machine_tag
from .runner import add_ratios, run_preset
from .presets import NATIVE_TARGET, NATIVE_TARGET_IMPLS, preset
from .workloads import build_step, supports
from .workloads import unavailable as why_not


def _device(name=None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def cases_for(workloads, preset_name="quick", device=None, native_target=False):
    p = preset(preset_name, _device(device))
    if native_target:
        return p, [NATIVE_TARGET]
    cases = [c for c in p.cases if c.workload in workloads and c != NATIVE_TARGET]
    if not cases:  # the quick preset keeps headline figures only: the full sweep's smallest size
        full = [c for c in preset("full", _device(device)).cases
                if c.workload in workloads and c != NATIVE_TARGET]
        small = min((c.tokens, c.dtype != full[0].dtype) for c in full)
        cases = [c for c in full if (c.tokens, c.dtype != full[0].dtype) == small]
    return p, cases


def main(name: str, workloads, argv=None, native_target=False, script=None) -> int:
    """``python benchmarks/<script>.py [--quick|--full] [--out DIR] [--impl a,b]``."""
    ap = argparse.ArgumentParser(prog=name, description=f"fastdpo benchmark: {name}")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick")
    g.add_argument("--full", dest="preset", action="store_const", const="full")
    ap.set_defaults(preset="quick")
    ap.add_argument("--out", type=Path, default=(Path(script).resolve().parent / "results"
                                                 if script else Path("benchmarks/results")))
    ap.add_argument("--device", default=None)
    ap.add_argument("--impl", default=None)
    args = ap.parse_args(argv)
    device = _device(args.device)
    p, cases = cases_for(workloads, args.preset, device, native_target)
    impls = by_name(split_names(args.impl)) if args.impl else by_name()
    sub = replace(p, cases=tuple(cases), memory_cases=(), target_impls=NATIVE_TARGET_IMPLS)
    info = machine_info()
    print(f"{name} --{args.preset} on {report.machine_line(info)}")
    ceil = Ceilings(device) if any(c.gemms() for c in cases) else None  # x bare GEMMs
    rows = run_preset(sub, impls, device, ceiling=ceil)
    add_ratios(rows)
    tag, ts = machine_tag(info), report.stamp(info)
    files = report.write_json({"kind": name, "machine": info, "preset": args.preset,
                               "rows": rows}, args.out, name, tag, ts)
    files += report.write_csv(rows, info, args.out, name, tag, ts)
    files += report.write_plot(rows, "median_s", "median time per step (ms)",
                               f"{name} - {report.machine_line(info)}", args.out, name, tag, ts,
                               scale=1e3)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def pytest_params(workloads, native_target=False):
    """``(case, impl name)`` pairs of the quick preset for ``pytest.mark.parametrize``."""
    _, cases = cases_for(workloads, "quick", None, native_target)
    out = []
    for case in cases:
        for impl in by_name():
            if supports(impl, case) and (not native_target or impl.name in NATIVE_TARGET_IMPLS
                                         or impl.family == "fastdpo"):
                out.append((case, impl.name))
    return out


def param_id(case, impl_name) -> str:
    return f"{impl_name}-{case.workload}-V{case.vocab}-N{case.tokens}-{case.dtype}"


def pytest_benchmark(benchmark, case, impl_name, rounds=3):
    """Time one (case, implementation) with pytest-benchmark; inputs are rebuilt untimed."""
    import pytest

    device = _device()
    impl = by_name([impl_name])[0]
    why = why_not(impl, case, device)
    if why:
        pytest.skip(why)
    step = build_step(case, impl, device)
    step.run(step.setup())  # warm-up (compilation) outside the rounds

    def setup():
        return (step.setup(),), {}

    benchmark.extra_info.update(case=case.to_dict(), impl=impl_name, device=device)
    benchmark.pedantic(step.run, setup=setup, rounds=rounds, iterations=1)
