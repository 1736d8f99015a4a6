"""Counts the multiply-adds of the matmuls that run, from the profiler (no timing)."""

import torch


class MatmulFlops:
    """Multiply-adds of every mm / addmm that runs (inside custom ops too), from the profiler's
    record of each aten call and its input shapes; with ``vocab``, only the calls that involve
    that dimension (an LM head's, inside a whole model)."""

    NAMES = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::addmm_": (1, 2)}

    def __init__(self, vocab=None):
        self.vocab = vocab

    def __enter__(self):
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                           record_shapes=True)
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        self.macs = 0
        for e in self.prof.events():
            if e.name in self.NAMES:
                i, j = self.NAMES[e.name]
                a, b = e.input_shapes[i], e.input_shapes[j]
                if self.vocab is None or self.vocab in (a[0], a[1], b[1]):
                    self.macs += a[0] * a[1] * b[1]
        return False
