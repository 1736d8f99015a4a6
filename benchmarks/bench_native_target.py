"""The native backend's CPU target: fp32 logits, forward + backward of sequence_logps at N = 2048,
V = 128256, fastdpo (native, torch) next to eager PyTorch, torch.compile and TRL's
selective_log_softmax. Speedups and peak memory are summarised by ``fastdpo bench --quick``.

Run directly (writes JSON/CSV/PNG to benchmarks/results/)::

    python benchmarks/bench_native_target.py [--quick|--full] [--impl fastdpo[native],eager]

or with pytest-benchmark::

    python -m pytest benchmarks/bench_native_target.py --benchmark-only
"""

# The same few lines stand in every bench_*.py on purpose: pytest-benchmark collects one module
# per workload; all the work is in fastdpo.bench.scripting.
import sys

import pytest

from fastdpo.bench import scripting

WORKLOADS = ("logps_fwd_bwd",)
NATIVE_TARGET = True
PARAMS = scripting.pytest_params(WORKLOADS, NATIVE_TARGET)


@pytest.mark.parametrize("case,impl", PARAMS, ids=[scripting.param_id(*p) for p in PARAMS])
def test_native_target(benchmark, case, impl):
    scripting.pytest_benchmark(benchmark, case, impl)


if __name__ == "__main__":
    sys.exit(scripting.main("native_target", WORKLOADS, native_target=NATIVE_TARGET,
                             script=__file__))
