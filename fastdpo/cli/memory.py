"""``fastdpo memory``: peak memory per implementation vs vocabulary and tokens, bytes saved for
backward, and with ``--budget X`` the largest batch that fits in X GiB."""

from __future__ import annotations

from .bench import GPU_HELP, add_measure_arguments, add_preset_arguments, list_impls


def add_arguments(parser) -> None:
    add_preset_arguments(parser, gpu_help=GPU_HELP)
    add_measure_arguments(parser)


def run(args) -> int:
    from fastdpo.bench.jobs import default_device, memory_job

    device = args.device or default_device()
    if args.list:
        return list_impls(device)
    memory_job(args.preset, device, args.out, impls=args.impl, budget_gib=args.budget,
               seq_len=args.seq_len)
    return 0
