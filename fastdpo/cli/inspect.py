"""``fastdpo inspect``: GPU kernel quality without a GPU.

Counts each Triton kernel's global-memory traffic under the interpreter (vs. the minimum: logits
read once, gradient written once), compiles fastdpo's and the peers' kernels (and csrc/cuda) ahead
of time for sm_80/sm_90 to report registers, spills, shared memory and load widths in the
streaming loops, and turns the counted bytes into roofline *estimates* for H100 and A100.
"""

from __future__ import annotations

from pathlib import Path

from .bench import add_preset_arguments


def add_arguments(parser) -> None:
    add_preset_arguments(parser, quick_help="two vocabularies, fp32/bf16 (default)",
                         full_help="every vocabulary and fp16 too", outputs="JSON/CSV")
    parser.add_argument("--arch", default="80,90", help="compute capabilities (default: 80,90)")
    parser.add_argument("--no-cuda-sources", action="store_true",
                        help="skip nvcc builds of csrc/cuda/*.cu")
    parser.add_argument("--variants", action="store_true",
                        help="only: compile every Triton kernel variant fastdpo's launchers can "
                             "pick (logits and fused linear) for --arch and list registers and "
                             "spills; exit 1 if any fails to compile")
    parser.add_argument("--shapes", default=None, metavar="B,T,H,V;...",
                        help="shapes for --variants (default: the GPU bench's smallest and "
                             "largest)")


def source_root() -> str | None:
    """The source tree holding csrc/ (an editable install or a checkout), else None."""
    import fastdpo

    root = Path(fastdpo.__file__).resolve().parent.parent
    return str(root) if (root / "csrc" / "cuda").is_dir() else None


def run(args) -> int:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        print("fastdpo inspect: skipped, it needs triton (not installed here): the kernels it "
              "counts and compiles are Triton's. `pip install triton` and run it again.")
        return 0
    from fastdpo.bench import inspect as ins
    from fastdpo.bench.machine import machine_info

    archs = tuple(int(a) for a in args.arch.split(","))
    if args.variants:
        return variants(args, archs)
    cuda_root = None if args.no_cuda_sources else source_root()
    res = ins.run(quick=args.preset == "quick", archs=archs, cuda_root=cuda_root)
    print("\nmemory traffic (counted under TRITON_INTERPRET=1; ratio = bytes / minimum)")
    print(ins.traffic_table(res["traffic"]))
    print("\nahead-of-time builds (no GPU): registers, spill bytes, shared memory, access widths "
          "in the streaming loops (bits)")
    print(ins.static_table(res["static"]))
    print()
    print(ins.roofline_table(res["roofline"]))
    print("\nnot counted: " + "; ".join(f"{k} ({v})" for k, v in res["not_counted"].items()))
    files = ins.write(res, args.out, machine_info())
    print("\nwrote " + ", ".join(str(f) for f in files))
    return 0


def variants(args, archs) -> int:
    import json
    import time

    from fastdpo.bench.inspect import static

    shapes = (tuple(tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";"))
              if args.shapes else static.GPU_BENCH_SHAPES)
    t0 = time.perf_counter()
    rows = static.variants(shapes, archs)
    print(static.variants_table(rows))
    bad = [r for r in rows if "error" in r]
    spills = [r for r in rows
              if (r.get("spill_store_bytes") or 0) + (r.get("spill_load_bytes") or 0)]
    print(f"\n{len(rows)} variants compiled in {time.perf_counter() - t0:.0f} s: {len(bad)} "
          f"errors, {len(spills)} with spills")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "inspect-variants.json"
    path.write_text(json.dumps(rows, indent=1, default=str))
    print(f"wrote {path}")
    return 1 if bad or not rows else 0
