"""FastDPOTrainer's training step against its log-prob-pass route and TRL's DPOTrainer
(``fastdpo bench --preset trl-step`` as a script; a few minutes on 2 CPU cores)::

    python benchmarks/bench_trl_step.py
"""

# The same few lines stand in every bench_*.py on purpose: all the work is in fastdpo.bench.
import sys

from fastdpo.cli import main as cli

if __name__ == "__main__":
    sys.exit(cli.main(["bench", "--preset", "trl-step", *sys.argv[1:]]))
