"""Fused LM head: hidden states + weight -> sequence log-probs, forward + backward (trained and
frozen head), each row also as a multiple of the same run's bare GEMMs, against
eager/compiled matmul + log_softmax, TRL's chunked LM head, Liger's fused linear cross entropy and
Cut Cross-Entropy (each where it runs).

Run directly (writes JSON/CSV/PNG to benchmarks/results/)::

    python benchmarks/bench_linear_logps.py [--quick|--full] [--impl fastdpo[native],eager]

or with pytest-benchmark::

    python -m pytest benchmarks/bench_linear_logps.py --benchmark-only
"""

# The same few lines stand in every bench_*.py on purpose: pytest-benchmark collects one module
# per workload; all the work is in fastdpo.bench.scripting.
import sys

import pytest

from fastdpo.bench import scripting

WORKLOADS = ("linear_fwd_bwd", "linear_frozen_fwd_bwd")
NATIVE_TARGET = False
PARAMS = scripting.pytest_params(WORKLOADS, NATIVE_TARGET)


@pytest.mark.parametrize("case,impl", PARAMS, ids=[scripting.param_id(*p) for p in PARAMS])
def test_linear_logps(benchmark, case, impl):
    scripting.pytest_benchmark(benchmark, case, impl)


if __name__ == "__main__":
    sys.exit(scripting.main("linear_logps", WORKLOADS, native_target=NATIVE_TARGET,
                             script=__file__))
