"""Report writers: JSON (everything), CSV (one row per measurement, machine columns included) and
PNG plots (time and peak memory vs vocabulary size, one line per implementation; matplotlib Agg).

Files are named ``<kind>-<machine tag>-<UTC timestamp>.<ext>`` and copied to
``<kind>-latest.<ext>`` so the newest result has a stable path.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

MACHINE_COLUMNS = ("cpu_model", "torch_threads", "gpu", "hostname", "timestamp")


def stamp(info: dict) -> str:
    return info["timestamp"].replace("-", "").replace(":", "").replace("+0000", "Z")[:15] + "Z"


def _latest(path: Path, kind: str) -> Path:
    dst = path.with_name(f"{kind}-latest{''.join(path.suffixes[-1:])}")
    shutil.copyfile(path, dst)
    return dst


def write_json(obj: dict, out_dir: Path, kind: str, tag: str, ts: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / f"{kind}-{tag}-{ts}.json"
    p.write_text(json.dumps(obj, indent=1, default=str))
    return [p, _latest(p, kind)]


def write_text(text: str, out_dir: Path, kind: str, tag: str, ts: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / f"{kind}-{tag}-{ts}.txt"
    p.write_text(text + "\n")
    return [p, _latest(p, kind)]


def append_jsonl(row: dict, path: Path) -> None:
    """One row per line as it is measured: what an interrupted run leaves behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def _flat(machine: dict) -> dict:
    gpu = machine.get("gpu") or {}
    return {"machine_cpu_model": machine.get("cpu_model"),
            "machine_torch_threads": machine.get("torch_threads"),
            "machine_gpu": gpu.get("name"), "machine_hostname": machine.get("hostname"),
            "machine_timestamp": machine.get("timestamp"),
            "machine_torch": machine.get("versions", {}).get("torch")}


def write_csv(rows: list[dict], machine: dict, out_dir: Path, kind: str, tag: str,
              ts: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / f"{kind}-{tag}-{ts}.csv"
    flat = _flat(machine)
    rows = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} | flat for r in rows]
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return [p, _latest(p, kind)]


def _groups(rows, value_key):
    """{(workload, dtype, tokens, batch, hidden): {impl: [(vocab, value)]}} of rows with values."""
    g: dict[tuple, dict] = {}
    for r in rows:
        if r.get("status") != "ok" or r.get(value_key) is None:
            continue
        key = (r["workload"], r["dtype"], r["tokens"], r.get("batch", 1), r.get("hidden", 0))
        g.setdefault(key, {}).setdefault(r["impl"], []).append((r["vocab"], r[value_key]))
    return g


def plots_unavailable() -> str:
    """Why plots can't be drawn here ("" when they can): matplotlib is optional."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return f"matplotlib is not installed ({exc})"
    return ""


def plot_vs_vocab(rows, value_key, ylabel, title, path: Path, scale=1.0,
                  log=True) -> Path | None:
    """One panel per (workload, dtype, tokens), one line per implementation (bars where the panel
    has a single vocabulary); None when there is nothing to draw or matplotlib is missing
    (:func:`plots_unavailable`)."""
    groups = _groups(rows, value_key)
    if not groups or plots_unavailable():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - the bar panels' axis formatter

    n = len(groups)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    for ax, ((wl, dt, toks, b, h), impls) in zip(axes.flat, sorted(groups.items())):
        vocabs = {v for pts in impls.values() for v, _ in pts}
        hs = f" H={h}" if h else ""
        if len(vocabs) == 1:  # one vocabulary: a bar per implementation
            names = sorted(impls)
            ax.barh(names, [impls[n][0][1] * scale for n in names],
                    color=["C0" if n.startswith("fastdpo") else "C7" for n in names])
            ax.tick_params(axis="y", labelsize=7)
            ax.set_title(f"{wl} {dt} N={toks}{hs} V={vocabs.pop()}", fontsize=9)
            ax.set_xlabel(ylabel)
            if log:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, axis="x", alpha=0.3)
            continue
        for name, pts in sorted(impls.items()):
            pts.sort()
            style = "-o" if name.startswith("fastdpo") else "--s"
            ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], style, label=name, ms=4)
        ax.set_title(f"{wl} {dt} N={toks}{hs}", fontsize=9)
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=8 if cols == 1 else 10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plot(rows, value_key, ylabel, title, out_dir: Path, kind: str, tag: str, ts: str,
               scale=1.0, log=True) -> list[Path]:
    p = plot_vs_vocab(rows, value_key, ylabel, title, out_dir / f"{kind}-{tag}-{ts}.png", scale,
                      log)
    return [p, _latest(p, kind)] if p else []


def machine_line(m: dict, sep: str = ", ") -> str:
    gpu = (m.get("gpu") or {}).get("name") or "no GPU"
    return (f"{m['cpu_model']} ({m['cpu_count']} CPUs, torch threads {m['torch_threads']}), "
            f"{gpu}{sep}torch {m['versions']['torch']}, measured {m['timestamp']}")
