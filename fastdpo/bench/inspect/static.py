"""Ahead-of-time compilation for sm_80 / sm_90 without a GPU, and what the compiled code says.

Triton kernels are built with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
using the same meta-parameters and specialisation (16-byte divisibility of pointers, strides and
sizes) the JIT would use on a GPU:

* fastdpo's log-prob kernels from ``fastdpo.triton.logps.compile_spec`` (the launchers' own
  configuration), at a representative vocabulary;
* every variant fastdpo's launchers can pick at a real shape (fused linear included), from
  :func:`fastdpo.triton.aot.compile_specs` (``--variants`` prints them for one architecture);
* the peers' kernels from a launch recorded under the interpreter (:mod:`.traffic`), re-typed
  exactly as the JIT types arguments.

CUDA C++ kernels under ``csrc/cuda`` are built with ``nvcc -cubin`` and the shipped build's flags
(:mod:`fastdpo.native.build_flags`, one architecture at a time). For each kernel and
architecture: registers, spill bytes (``ptxas -v``), static + dynamic shared memory, local-memory
instructions in the SASS, and the widest/narrowest global load and store inside loops.

Triton decides at import whether a kernel is interpreted, so this runs in a fresh interpreter
with ``TRITON_INTERPRET=0`` (:func:`run_isolated`) whenever the current process interprets.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import sass

ARCHS = (80, 90)
TRITON_DTYPES = ("float32", "bfloat16", "float16")
REPRESENTATIVE_V = 128256


def _arch_name(cc: int) -> str:
    return "sm_90a" if cc == 90 else f"sm_{cc}"


def _triton_record(compiled, cc: int, workdir: Path, stem: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    cubin = workdir / f"{stem}.cubin"
    ptx = workdir / f"{stem}.ptx"
    cubin.write_bytes(compiled.asm["cubin"])
    ptx.write_text(compiled.asm["ptx"])
    name = compiled.metadata.name
    res = sass.resource_usage(cubin).get(name, {})
    spills = sass.ptxas_verbose(get_ptxas(cc).path, ptx, _arch_name(cc)).get(name, {})
    code = sass.sass_of_cubin(cubin).get(name)
    return {"arch": f"sm_{cc}", "kernel": name, "registers": res.get("registers"),
            "spill_store_bytes": spills.get("spill_store_bytes"),
            "spill_load_bytes": spills.get("spill_load_bytes"),
            "stack_bytes": res.get("stack_bytes"), "local_bytes": res.get("local_bytes"),
            "shared_bytes": int(compiled.metadata.shared),
            "num_warps": int(compiled.metadata.num_warps),
            "num_stages": int(getattr(compiled.metadata, "num_stages", 0)),
            "sass": code.to_dict() if code else None}


def _compile(fn, sig, const, attrs, opts, cc):
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    target = GPUTarget("cuda", cc, 32)
    backend = triton.compiler.make_backend(target)
    return triton.compile(src, target=target, options=backend.parse_options(dict(opts)).__dict__)


def fastdpo_aot_jobs(shapes, dtypes=TRITON_DTYPES) -> list[dict]:
    """Every kernel variant fastdpo's Triton launchers can pick at ``shapes`` (``(B, T, H, V)``;
    :func:`fastdpo.triton.aot.compile_specs`): logits and fused linear, forward and backward,
    each dtype and constexpr variant."""
    return [{"source": "aot", "shapes": [list(s) for s in shapes], "dtypes": list(dtypes)}]


def compile_aot(job: dict, cc: int, workdir: Path) -> list[dict]:
    import torch

    from fastdpo.triton import aot

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    out = []
    for spec in aot.compile_specs([tuple(s) for s in job["shapes"]],
                                  dtypes=tuple(dt[d] for d in job["dtypes"])):
        label = {"impl": "fastdpo[triton]", "variant": spec.name, "config": "launchers (GPU)",
                 "constexprs": spec.constexprs, "options": spec.options}
        t0 = time.perf_counter()
        try:
            compiled = aot.compile(spec, cc)
            stem = f"aot_{len(out)}_{cc}"
            rec = _triton_record(compiled, cc, workdir, stem)
        except Exception as exc:  # noqa: BLE001 - one variant failing is reported
            rec = {"arch": f"sm_{cc}", "error": f"{type(exc).__name__}: {exc}"[:600]}
        rec["compile_s"] = time.perf_counter() - t0
        out.append({**label, **rec})
    return out


def fastdpo_spec_jobs(dtypes=TRITON_DTYPES, entropy=(False, True), V=REPRESENTATIVE_V):
    return [{"source": "spec", "op": op, "dtype": dt, "with_entropy": ent, "V": V}
            for op in ("fwd", "bwd") for dt in dtypes for ent in entropy]


def _unwrap_jit(obj):
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn") and seen < 5:
        obj, seen = obj.fn, seen + 1
    if not isinstance(obj, JITFunction):
        raise TypeError(f"{obj!r} is not a Triton JIT function")
    return obj


def compile_job(job: dict, cc: int, workdir: Path) -> dict:
    """Compile one job (a ``compile_spec`` request or a recorded launch) for ``sm_<cc>``."""
    if job["source"] == "spec":
        import torch

        from fastdpo.triton import logps as tl_logps

        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        fn, sig, const, attrs, opts = tl_logps.compile_spec(job["op"], job["V"], dt[job["dtype"]],
                                                            with_entropy=job["with_entropy"])
        label = {"impl": "fastdpo[triton]", "op": job["op"], "dtype": job["dtype"],
                 "with_entropy": job["with_entropy"], "V": job["V"],
                 "config": "launch_config (GPU)", "constexprs": const, "options": opts}
    else:
        mod = importlib.import_module(job["module"])
        obj = mod
        for part in job["qualname"].split("."):
            obj = getattr(obj, part)
        fn = _unwrap_jit(obj)
        sig, const, attrs = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            p = job["params"].get(name)
            if p is None:
                raise ValueError(f"launch of {job['qualname']} has no argument {name!r}")
            if "constexpr" in p:
                sig[name] = "constexpr"
                const[name] = p["constexpr"]
            else:
                sig[name] = p["type"]
                if p.get("spec") == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
        opts = {"num_warps": job["options"].get("num_warps", 4),
                "num_stages": job["options"].get("num_stages", 3)}
        label = {"impl": job.get("impl", job["module"]), "op": job.get("op"),
                 "dtype": job.get("dtype"), "V": job.get("V"), "config": "as launched",
                 "constexprs": const, "options": opts}
    t0 = time.perf_counter()
    compiled = _compile(fn, sig, const, attrs, opts, cc)
    stem = f"{fn.__name__}_{abs(hash(json.dumps(label, sort_keys=True, default=str)))}_{cc}"
    rec = _triton_record(compiled, cc, workdir, stem)
    rec["compile_s"] = time.perf_counter() - t0
    return {**label, **rec}


# ---------------------------------------------------------------- CUDA C++ (csrc/cuda)


def cuda_sources(root: Path) -> list[Path]:
    return sorted((root / "csrc" / "cuda").glob("*.cu"))


def cuda_flags(root: Path, cc: int) -> list[str]:
    """The shipped nvcc flags (:mod:`fastdpo.native.build_flags`, as setup.py and
    csrc/cuda/check_nvcc.sh use them) for the one architecture ``sm_<cc>``."""
    from fastdpo.native import build_flags

    return [*build_flags.NVCC_FLAGS, "-gencode", f"arch=compute_{cc},code=sm_{cc}",
            *build_flags.include_flags(root)]


def compile_cuda(src: Path, cc: int, workdir: Path, root: Path) -> list[dict]:
    nvcc = sass.tool("nvcc") or "/usr/local/bin/nvcc"
    cubin = workdir / f"{src.stem}_sm{cc}.cubin"
    cmd = [nvcc, "-cubin", "-Xptxas", "-v", *cuda_flags(root, cc), str(src), "-o", str(cubin)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return [{"impl": "fastdpo[native,cuda]", "source": str(src.relative_to(root)),
                 "arch": f"sm_{cc}", "error": f"nvcc failed: {p.stderr.strip()[-600:]}"}]
    import re

    spills = {m.group(1): (int(m.group(3)), int(m.group(4))) for m in re.finditer(
        r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores,"
        r" (\d+) bytes spill loads", p.stderr)}
    res = sass.resource_usage(cubin)
    code = sass.sass_of_cubin(cubin)
    out = []
    for name, r in sorted(res.items()):
        st, ld = spills.get(name, (None, None))
        out.append({"impl": "fastdpo[native,cuda]", "source": str(src.relative_to(root)),
                    "arch": f"sm_{cc}", "kernel": _demangle(name), "mangled": name,
                    "registers": r["registers"], "spill_store_bytes": st, "spill_load_bytes": ld,
                    "stack_bytes": r["stack_bytes"], "local_bytes": r["local_bytes"],
                    "shared_bytes": r["static_shared_bytes"],
                    "sass": code[name].to_dict() if name in code else None,
                    "compile_s": time.perf_counter() - t0})
    return out


def _demangle(name: str) -> str:
    import shutil

    exe = shutil.which("c++filt") or sass.tool("cu++filt")
    if not exe:
        return name
    p = subprocess.run([exe, name], capture_output=True, text=True)
    return p.stdout.strip() or name


# ---------------------------------------------------------------- driver


def run_jobs(jobs: list[dict], archs=ARCHS, cuda_root: str | None = None) -> list[dict]:
    """Compile every job for every architecture here (kernels must not be interpreted)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="fastdpo-inspect-") as tmp:
        work = Path(tmp)
        for job in jobs:
            for cc in archs:
                if job["source"] == "aot":
                    out.extend(compile_aot(job, cc, work))
                    continue
                try:
                    out.append(compile_job(job, cc, work))
                except Exception as exc:  # noqa: BLE001 - one kernel failing is reported
                    out.append({**{k: v for k, v in job.items() if k != "params"},
                                "arch": f"sm_{cc}", "error": f"{type(exc).__name__}: {exc}"[:600]})
        if cuda_root:
            root = Path(cuda_root)
            for src in cuda_sources(root):
                for cc in archs:
                    out.extend(compile_cuda(src, cc, work, root))
    return out


def run_isolated(jobs: list[dict], archs=ARCHS, cuda_root: str | None = None,
                 timeout: float = 900) -> list[dict]:
    spec = json.dumps({"jobs": jobs, "archs": list(archs), "cuda_root": cuda_root}, default=str)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    p = subprocess.run([sys.executable, "-m", "fastdpo.bench.inspect.static"], input=spec,
                       capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("[")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"static child failed ({p.returncode}): {p.stderr.strip()[-800:]}")
    return json.loads(lines[-1])


def compile_all(jobs, archs=ARCHS, cuda_root=None) -> list[dict]:
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interpreting or "triton" in sys.modules and _kernels_interpreted():
        return run_isolated(jobs, archs, cuda_root)
    return run_jobs(jobs, archs, cuda_root)


def _kernels_interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction

        from fastdpo.triton import logps as tl_logps

        return isinstance(tl_logps._logps_fwd_kernel, InterpretedFunction)
    except Exception:  # noqa: BLE001
        return False


def variants_table(rows) -> str:
    """One line per compiled variant: registers, spills, shared memory, warps, stages."""
    lines = [f"{'variant':72s} {'arch':6s} {'regs':>4s} {'spill':>6s} {'smem':>7s} {'warps':>5s} "
             f"{'stages':>6s}"]
    for r in rows:
        name = r.get("variant") or r.get("kernel") or r.get("qualname") or "?"
        if "error" in r:
            lines.append(f"{name[:72]:72s} {r['arch']:6s} error: {r['error'][:120]}")
            continue
        spill = (r.get("spill_store_bytes") or 0) + (r.get("spill_load_bytes") or 0)
        lines.append(f"{name[:72]:72s} {r['arch']:6s} {r['registers']!s:>4s} {spill:6d} "
                     f"{r['shared_bytes']:7d} {r.get('num_warps', '-')!s:>5s} "
                     f"{r.get('num_stages', '-')!s:>6s}")
    return "\n".join(lines)


GPU_BENCH_SHAPES = ((1, 4096, 4096, 128256), (1, 16384, 4096, 256000))  # (B, T, H, V)


def variants(shapes=GPU_BENCH_SHAPES, archs=(90,)) -> list[dict]:
    """Every fastdpo Triton variant at ``shapes`` compiled for ``archs`` (``fastdpo inspect
    --variants``)."""
    return compile_all(fastdpo_aot_jobs(shapes), tuple(archs))


def main() -> int:
    spec = json.loads(sys.stdin.read())
    res = run_jobs(spec["jobs"], tuple(spec["archs"]), spec.get("cuda_root"))
    print(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
