"""Timing: median and spread over repeats, warm-up excluded.

CPU steps are timed with ``time.perf_counter``; CUDA steps with CUDA events around the step, the L2
cache flushed before each repeat (like ``triton.testing.do_bench``) so a step never reads inputs a
previous repeat left in cache. A step may destroy its inputs (in-place backward), so every repeat
gets fresh state from ``setup`` outside the timed region.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Timing:
    median_s: float
    q25_s: float
    q75_s: float
    min_s: float
    max_s: float
    repeats: int
    warmup: int
    clock: str  # "perf_counter" or "cuda_event"
    samples_s: list

    @property
    def iqr_rel(self) -> float:
        """Interquartile range relative to the median (the spread reported next to it)."""
        return (self.q75_s - self.q25_s) / self.median_s if self.median_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["iqr_rel"] = self.iqr_rel
        return d


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples: list[float], warmup: int, clock: str) -> Timing:
    return Timing(median_s=statistics.median(samples), q25_s=_quantile(samples, 0.25),
                  q75_s=_quantile(samples, 0.75), min_s=min(samples), max_s=max(samples),
                  repeats=len(samples), warmup=warmup, clock=clock, samples_s=list(samples))


_l2_flush = None


def _flush_l2(device: torch.device) -> None:
    global _l2_flush
    if _l2_flush is None or _l2_flush.device != device:
        _l2_flush = torch.empty(256 << 20, dtype=torch.int8, device=device)  # > any L2 today
    _l2_flush.zero_()


def measure(step, *, setup=None, device=torch.device("cpu"), warmup: int = 1, repeats: int = 5,
            max_seconds: float | None = None) -> Timing:
    """Time ``step(state)`` where ``state = setup()`` is rebuilt (untimed) before every call.

    ``warmup`` calls run first and are discarded (compilation, allocator growth, page faults).
    ``max_seconds`` stops adding repeats once spent (at least 3 are kept when warm-up allowed it).
    """
    setup = setup or (lambda: None)
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        state = setup()
        step(state)
        del state
    if cuda:
        torch.cuda.synchronize(device)
    samples: list[float] = []
    spent = 0.0
    for i in range(repeats):
        state = setup()
        gc.collect()
        if cuda:
            _flush_l2(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            out = step(state)
            end.record()
            torch.cuda.synchronize(device)
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            out = step(state)
            dt = time.perf_counter() - t0
        del out, state
        samples.append(dt)
        spent += dt
        if max_seconds is not None and spent > max_seconds and i + 1 >= 3:
            break
    return summarize(samples, warmup, "cuda_event" if cuda else "perf_counter")
