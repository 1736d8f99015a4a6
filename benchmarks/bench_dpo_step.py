"""A whole DPO step from logits: policy forward + backward, reference pass, sigmoid DPO loss.

Run directly (writes JSON/CSV/PNG to benchmarks/results/)::

    python benchmarks/bench_dpo_step.py [--quick|--full] [--impl fastdpo[native],eager]

or with pytest-benchmark::

    python -m pytest benchmarks/bench_dpo_step.py --benchmark-only
"""

# The same few lines stand in every bench_*.py on purpose: pytest-benchmark collects one module
# per workload; all the work is in fastdpo.bench.scripting.
import sys

import pytest

from fastdpo.bench import scripting

WORKLOADS = ("dpo_step",)
NATIVE_TARGET = False
PARAMS = scripting.pytest_params(WORKLOADS, NATIVE_TARGET)


@pytest.mark.parametrize("case,impl", PARAMS, ids=[scripting.param_id(*p) for p in PARAMS])
def test_dpo_step(benchmark, case, impl):
    scripting.pytest_benchmark(benchmark, case, impl)


if __name__ == "__main__":
    sys.exit(scripting.main("dpo_step", WORKLOADS, native_target=NATIVE_TARGET,
                             script=__file__))
