"""sequence_logps forward + backward to the logits over vocabularies and dtypes.

Run directly (writes JSON/CSV/PNG to benchmarks/results/)::

    python benchmarks/bench_logps_forward_backward.py [--quick|--full] [--impl eager,...]

or with pytest-benchmark::

    python -m pytest benchmarks/bench_logps_forward_backward.py --benchmark-only
"""

# The same few lines stand in every bench_*.py on purpose: pytest-benchmark collects one module
# per workload; all the work is in fastdpo.bench.scripting.
import sys

import pytest

from fastdpo.bench import scripting

WORKLOADS = ("logps_fwd_bwd",)
NATIVE_TARGET = False
PARAMS = scripting.pytest_params(WORKLOADS, NATIVE_TARGET)


@pytest.mark.parametrize("case,impl", PARAMS, ids=[scripting.param_id(*p) for p in PARAMS])
def test_logps_forward_backward(benchmark, case, impl):
    scripting.pytest_benchmark(benchmark, case, impl)


if __name__ == "__main__":
    sys.exit(scripting.main("logps_forward_backward", WORKLOADS, native_target=NATIVE_TARGET,
                             script=__file__))
