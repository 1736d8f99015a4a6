"""``fastdpo info``: what will run here, and why the rest won't."""

from __future__ import annotations

import json

import torch


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def collect() -> dict:
    from fastdpo import backends
    from fastdpo.bench import machine

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    table = {}
    for dev in devices:
        for name in backends.CHOICES[1:]:
            why = backends.device_reason(name, dev)
            table[f"{name}@{dev.type}"] = "available" if not why else f"unavailable: {why}"
        table[f"auto@{dev.type}"] = backends.resolve("auto", dev, torch.float32)
    return {
        "versions": machine.versions(),
        "cpu": machine.cpu_model(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backends": table,
    }


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("versions:")
    for k, v in info["versions"].items():
        print(f"  {k:18s} {v if v is not None else '-'}")
    print(f"cpu: {info['cpu']} ({info['threads']} threads)   cuda: {info['cuda'] or 'none'}")
    print("backends:")
    for k, v in info["backends"].items():
        print(f"  {k:14s} {v}")
    return 0
