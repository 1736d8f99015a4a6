"""Benchmark harness, memory profiler and GPU-kernel inspection behind ``fastdpo bench``,
``fastdpo memory`` and ``fastdpo inspect``.

One concept per module: :mod:`.machine` (what ran it), :mod:`.timing` (median and spread of
repeats), :mod:`.workloads` (steps and their inputs), :mod:`.presets` (what ``--quick``,
``--full``, ``--gpu`` and ``--preset lmhead-goals`` run), :mod:`.impls` (fastdpo backends and the
peers, each with the reason when it can't run), :mod:`.ceilings` (same-run copy bandwidth and
bare GEMMs), :mod:`.progress` (estimates and progress lines), :mod:`.limits` (per-row time and
memory limits of heavy presets), :mod:`.runner` (timed sweeps), :mod:`.memory` (peak memory and
bytes saved for backward), :mod:`.lmhead` (the fused LM head's summary and memory goal), :mod:`.busy` (the
slowdown beside a busy process, quiet and busy steps in paired rounds),
:mod:`.report` (JSON, CSV, PNG, text), :mod:`.jobs` (the CLI jobs), :mod:`.scripting` (the
scripts under benchmarks/) and :mod:`.inspect` (memory traffic under the Triton interpreter,
ahead-of-time register/SASS analysis, roofline estimates).
"""
