"""``fastdpo bench``: time fastdpo against its peers here, then profile peak memory.

The main job in one command: ``fastdpo bench --quick`` runs the timed sweep (including the native
CPU target), the memory report, and writes JSON/CSV/PNG under ``--out`` (PNG only where matplotlib
is installed: without it the plots are skipped, said so, and the command still succeeds).
"""

from __future__ import annotations

from pathlib import Path


def add_preset_arguments(parser, *, quick_help="the headline figures: <= 4 minutes on 2 CPU "
                         "cores (default)", full_help="every vocabulary, more token counts and "
                         "dtypes", outputs="JSON/CSV/PNG", gpu_help=None,
                         named_presets=()) -> None:
    """``--quick`` / ``--full`` (/ ``--gpu``, / ``--preset NAME`` for ``named_presets``) and
    ``--out``, shared by ``bench``, ``memory`` and ``inspect``."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick", help=quick_help)
    g.add_argument("--full", dest="preset", action="store_const", const="full", help=full_help)
    if gpu_help:
        g.add_argument("--gpu", dest="preset", action="store_const", const="gpu", help=gpu_help)
    if named_presets:
        g.add_argument("--preset", dest="preset", choices=named_presets,
                       help="a preset by name: " + "; ".join(f"{k}: {v}" for k, v in
                                                             NAMED_HELP.items()
                                                             if k in named_presets))
    parser.set_defaults(preset="quick")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help=f"directory for {outputs} (default: benchmarks/results)")


def add_measure_arguments(parser) -> None:
    """Device, implementations and the memory budget question of ``bench`` and ``memory``."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--impl", default=None,
                        help="comma list of implementations (default: all; see --list)")
    parser.add_argument("--budget", type=float, default=None, metavar="GIB",
                        help="also answer: the largest batch of --seq-len tokens fitting GIB GiB")
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length for --budget")
    parser.add_argument("--list", action="store_true", help="list implementations and exit")


NAMED_HELP = {"quick": "= --quick", "full": "= --full", "gpu": "= --gpu",
              "lmhead-goals": "the fused LM head at the goal shapes, fp32 (N, H, V) = (1024, "
              "512, 32000), (2048, 256, 128256), (4096, 1024, 128256): DPO step and frozen-head "
              "policy pass against every peer, x bare GEMMs and peak memory against one chunk's "
              "logits + 5%% of the full logits; heavy (tens of minutes on 2 cores), one repeat on "
              "the biggest shape, --row-limit per row",
              "lmhead-busy": "the DPO step at the same shapes, quiet and beside --busy N "
              "(default 1) spinning processes in paired rounds: each implementation's "
              "slowdown, fastdpo's against eager's",
              "trl-step": "FastDPOTrainer's training step (compute_loss + backward) against "
              "its log-prob-pass route and TRL's DPOTrainer, a small random Llama with V = "
              "32000 and 128256 (a few minutes)"}

GPU_HELP = ("the GPU machine's sweep (V 32k-256k, N 4096/16384, bf16/fp32, fused LM head at "
            "H=4096, DPO steps), most important first; tiny sizes on CPU (the dry run)")


def add_arguments(parser) -> None:
    add_preset_arguments(parser, gpu_help=GPU_HELP, named_presets=tuple(NAMED_HELP))
    add_measure_arguments(parser)
    parser.add_argument("--workload", default=None,
                        help="comma list of workloads to time (default: all in the preset)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the memory report (timing only)")
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="run N processes spinning a core each during the measurements "
                             "(a busy training box: data loader, second job)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="stop starting new measurements after S seconds (the rest are "
                             "reported as skipped)")
    parser.add_argument("--row-limit", type=float, default=None, metavar="S",
                        help="per (case, implementation): skip, saying so, what is predicted "
                             "to take longer than S seconds (default: the preset's; "
                             "lmhead-goals: 600)")


def list_impls(device) -> int:
    import torch

    from fastdpo.bench.impls import all_impls

    for impl in all_impls():
        for kind in impl.kinds:
            why = impl.unavailable(torch.device(device), kind=kind)
            print(f"{impl.name:34s} {kind:11s} {'available' if not why else 'unavailable: ' + why}")
    return 0


def run(args) -> int:
    from fastdpo.bench.jobs import bench_job, default_device

    device = args.device or default_device()
    if args.list:
        return list_impls(device)
    from fastdpo.bench.machine import competing_load

    workloads = args.workload.split(",") if args.workload else None
    if args.preset == "trl-step":
        from fastdpo.bench.trainer import trainer_job

        given = [f for f, v in (("--workload", args.workload), ("--time-limit", args.time_limit),
                                ("--row-limit", args.row_limit), ("--budget", args.budget),
                                ("--impl", args.impl), ("--device", args.device))
                 if v is not None] + (["--busy"] if args.busy else [])
        if given:
            raise SystemExit(f"fastdpo bench --preset trl-step takes no {', '.join(given)} "
                             "(it times the three trainers' step on CPU)")
        trainer_job(args.out)
        return 0
    if args.preset == "lmhead-busy":
        from fastdpo.bench.jobs import busy_job

        given = [f for f, v in (("--workload", args.workload), ("--time-limit", args.time_limit),
                                ("--row-limit", args.row_limit), ("--budget", args.budget))
                 if v is not None]
        if given:
            raise SystemExit(f"fastdpo bench --preset lmhead-busy takes no {', '.join(given)} "
                             "(it times the DPO step at the goal shapes, every round)")

        busy_job(device, args.out, impls=args.impl, busy=args.busy or 1)
        return 0
    with competing_load(args.busy):
        bench_job(args.preset, device, args.out, impls=args.impl, workloads=workloads,
                  with_memory=not args.no_memory, budget_gib=args.budget, seq_len=args.seq_len,
                  time_limit_s=args.time_limit, row_limit_s=args.row_limit)
    return 0
