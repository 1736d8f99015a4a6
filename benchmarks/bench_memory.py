"""Peak memory per implementation vs vocabulary and tokens (``fastdpo memory`` as a script)::

    python benchmarks/bench_memory.py [--quick|--full] [--budget 80 --seq-len 4096]
"""

# The same few lines stand in every bench_*.py on purpose: pytest-benchmark collects one module
# per workload; all the work is in fastdpo.bench.scripting.
import sys

from fastdpo.cli import main as cli

if __name__ == "__main__":
    sys.exit(cli.main(["memory", *sys.argv[1:]]))
