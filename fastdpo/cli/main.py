"""``fastdpo`` console entry point. Each subcommand lives in its own module of this package,
exposing ``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "info": ("fastdpo.cli.info", "versions, backends available (and why not), devices"),
    "bench": ("fastdpo.cli.bench", "benchmark fastdpo against its peers on this machine"),
    "memory": ("fastdpo.cli.memory", "peak memory of each implementation vs vocabulary size"),
    "inspect": ("fastdpo.cli.inspect", "GPU kernel quality without a GPU: traffic, registers"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastdpo", description=__doc__.split(".")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_)
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints usage / error
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    sp = argparse.ArgumentParser(prog=f"fastdpo {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
    module.add_arguments(sp)
    return int(module.run(sp.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
