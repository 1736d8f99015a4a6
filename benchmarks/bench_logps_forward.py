"""sequence_logps forward (autograd graph built, as in training) over vocabularies and dtypes.

Run directly (writes JSON/CSV/PNG to benchmarks/results/)::

    python benchmarks/bench_logps_forward.py [--quick|--full] [--impl fastdpo[native],eager]

or with pytest-benchmark::

    python -m pytest benchmarks/bench_logps_forward.py --benchmark-only
"""

# The same few lines stand in every bench_*.py on purpose: pytest-benchmark collects one module
# per workload; all the work is in fastdpo.bench.scripting.
import sys

import pytest

from fastdpo.bench import scripting

WORKLOADS = ("logps_fwd",)
NATIVE_TARGET = False
PARAMS = scripting.pytest_params(WORKLOADS, NATIVE_TARGET)


@pytest.mark.parametrize("case,impl", PARAMS, ids=[scripting.param_id(*p) for p in PARAMS])
def test_logps_forward(benchmark, case, impl):
    scripting.pytest_benchmark(benchmark, case, impl)


if __name__ == "__main__":
    sys.exit(scripting.main("logps_forward", WORKLOADS, native_target=NATIVE_TARGET,
                             script=__file__))
