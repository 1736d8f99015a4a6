"""What a result was measured on: CPU model, cores, threads, GPU, library versions."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import socket
import subprocess
import sys

import torch

_competing = 0  # busy processes running beside the measurement (see competing_load)

PEER_MODULES = ("triton", "transformers", "trl", "liger_kernel", "cut_cross_entropy", "flash_attn",
                "numpy", "matplotlib")


def cpu_model() -> str:
    """The ``model name`` line of /proc/cpuinfo (falls back to :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD features that matter for the native CPU kernels."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return []
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    have = set(m.group(1).split()) if m else set()
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16")
    return [x for x in wanted if x in have]


def meminfo_bytes(key: str) -> int | None:
    """A ``/proc/meminfo`` entry (``MemTotal``, ``MemAvailable``) in bytes; None where absent."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_total_bytes() -> int | None:
    return meminfo_bytes("MemTotal")


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import fastdpo

        out["fastdpo"] = fastdpo.__version__
    except Exception:  # noqa: BLE001 - reported as missing
        out["fastdpo"] = None
    dist = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy",
            "flash_attn": "flash-attn"}
    for mod in PEER_MODULES:
        try:  # metadata, not import: importing trl/transformers costs seconds
            out[mod] = md.version(dist.get(mod, mod))
        except md.PackageNotFoundError:
            out[mod] = None
    return out


def gpu_info() -> dict | None:
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "capability": f"{p.major}.{p.minor}",
            "memory_bytes": p.total_memory, "multiprocessors": p.multi_processor_count,
            "cuda": torch.version.cuda, "count": torch.cuda.device_count()}


def machine_info() -> dict:
    """Everything a reader needs to judge a result: measured where, with what."""
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": memory_total_bytes(),
        "gpu": gpu_info(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "competing_processes": _competing,
        "versions": versions(),
    }


@contextlib.contextmanager
def competing_load(n: int):
    """``n`` processes each spinning one core for the duration: the load a data loader or a
    second job puts on a training box. Recorded in :func:`machine_info`."""
    global _competing
    if n < 0:
        raise ValueError(f"the number of competing processes must be >= 0, got {n}")
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    _competing = n
    try:
        yield procs
    finally:
        _competing = 0
        for p in procs:
            p.kill()
            p.wait()


def machine_tag(info: dict) -> str:
    """Short file-name-safe tag: GPU name if any, else CPU model, plus thread count."""
    name = info["gpu"]["name"] if info.get("gpu") else info["cpu_model"]
    tag = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:40] or "machine"
    busy = f"-busy{info['competing_processes']}" if info.get("competing_processes") else ""
    return f"{tag}-{info['torch_threads']}t{busy}"
