"""Progress of a long stage: a time estimate up front, then ``[k/n, ~s left]`` on every line.

The estimate up front comes from a crude cost model per item (:func:`.ceilings.estimate_s`); once
items finish, what is left is rescaled by how far the measured time has strayed from the model.
"""

from __future__ import annotations

import time


def _fmt(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


class Progress:
    def __init__(self, stage: str, estimates: list[float], log=print):
        self.stage, self.est, self.log = stage, list(estimates), log
        self.t0 = time.monotonic()
        self.n_done = 0
        if log and self.est:
            log(f"{stage}: {len(self.est)} items, estimated {_fmt(sum(self.est))}")

    def done(self, k: int) -> None:
        self.n_done = k + 1

    def left_s(self) -> float:
        spent = time.monotonic() - self.t0
        planned = sum(self.est[: self.n_done])
        scale = spent / planned if planned > 0 and self.n_done else 1.0
        return sum(self.est[self.n_done:]) * scale

    def tag(self, k: int) -> str:
        return f"[{k + 1}/{len(self.est)}, ~{_fmt(self.left_s())} left]"

    def finish(self) -> None:
        if self.log and self.est:
            self.log(f"{self.stage}: done in {_fmt(time.monotonic() - self.t0)} "
                     f"(estimated {_fmt(sum(self.est))})")
