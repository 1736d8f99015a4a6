"""GPU kernel quality without a GPU (``fastdpo inspect`` as a script): memory traffic under the
Triton interpreter, sm_80/sm_90 registers, spills and load widths, roofline estimates::

    python benchmarks/bench_inspect.py [--quick|--full]
"""

# The same few lines stand in every bench_*.py on purpose: pytest-benchmark collects one module
# per workload; all the work is in fastdpo.bench.scripting.
import sys

from fastdpo.cli import main as cli

if __name__ == "__main__":
    sys.exit(cli.main(["inspect", *sys.argv[1:]]))
