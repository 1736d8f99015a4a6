"""The DPO step at the fused LM head's goal shapes, quiet and beside a busy process in paired
rounds (``fastdpo bench --preset lmhead-busy`` as a script; about 30 minutes on 2 CPU cores)::

    python benchmarks/bench_lmhead_busy.py [--busy 1] [--impl fastdpo[native],eager]
"""

# The same few lines stand in every bench_*.py on purpose: all the work is in fastdpo.bench.
import sys

from fastdpo.cli import main as cli

if __name__ == "__main__":
    sys.exit(cli.main(["bench", "--preset", "lmhead-busy", *sys.argv[1:]]))
