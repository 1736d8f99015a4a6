"""The fused LM head at the goal shapes against every peer (``fastdpo bench --preset
lmhead-goals`` as a script; heavy: tens of minutes on 2 CPU cores)::

    python benchmarks/bench_lmhead_goals.py [--row-limit 600] [--busy 1] [--no-memory]
"""

# The same few lines stand in every bench_*.py on purpose: pytest-benchmark collects one module
# per workload; all the work is in fastdpo.bench.
import sys

from fastdpo.cli import main as cli

if __name__ == "__main__":
    sys.exit(cli.main(["bench", "--preset", "lmhead-goals", *sys.argv[1:]]))
