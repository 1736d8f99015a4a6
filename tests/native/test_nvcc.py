"""CUDA kernels compile with exactly the shipped nvcc flags (fastdpo/native/build_flags.py, the one
definition setup.py, csrc/cuda/check_nvcc.sh and `fastdpo inspect` share) for sm_80 and sm_90,
with warnings as errors, and spill nothing; no GPU needed. Fails on any compile error; skips only
when the CUDA toolkit is absent."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastdpo.native import build_flags

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "csrc" / "cuda" / "check_nvcc.sh"
KERNEL = re.compile(r"^KERNEL (sm_\d+) (\S+) regs=(\d+) spill_stores=(\d+) spill_loads=(\d+) "
                    r"stack=(\d+)$", re.M)


def nvcc():
    return shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists()
                                    else None)


def test_one_definition_of_the_nvcc_flags():
    from fastdpo.bench.inspect import static

    shipped = build_flags.nvcc_flags(["80", "90"])
    assert shipped[:len(build_flags.NVCC_FLAGS)] == list(build_flags.NVCC_FLAGS)
    assert shipped[len(build_flags.NVCC_FLAGS):] == [
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "-gencode", "arch=compute_90,code=compute_90"]
    # `fastdpo inspect` compiles one architecture at a time with the same code generation flags.
    assert static.cuda_flags(ROOT, 90) == [*build_flags.NVCC_FLAGS, "-gencode",
                                           "arch=compute_90,code=sm_90",
                                           *build_flags.include_flags(ROOT)]
    # setup.py takes its list from build_flags and spells out no flag of its own.
    setup = (ROOT / "setup.py").read_text()
    assert "_build_flags().nvcc_flags()" in setup
    for flag in ("-std=", "-lineinfo", "-maxrregcount", "__CUDA_NO_", "-gencode"):
        assert flag not in setup, flag
    # Nor does check_nvcc.sh (its -std= is the host compiler's, for the torch glue).
    for flag in ("-lineinfo", "-maxrregcount", "-gencode", "__CUDA_NO_"):
        assert flag not in SCRIPT.read_text(), flag
    assert build_flags.archs({"FASTDPO_CUDA_ARCHS": "80; 90;100"}) == ["80", "90", "100"]
    with pytest.raises(ValueError, match="FASTDPO_CUDA_ARCHS"):
        build_flags.archs({"FASTDPO_CUDA_ARCHS": "sm_90"})


def test_cuda_kernels_compile_without_spills(tmp_path):
    exe = nvcc()
    if exe is None:
        pytest.skip("nvcc not found: the CUDA compile check needs the CUDA toolkit")
    env = {k: v for k, v in os.environ.items() if k != "FASTDPO_CUDA_ARCHS"}
    env.update(NVCC=exe, PYTHON=sys.executable)
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                         timeout=1800, env=env)
    log = run.stdout + run.stderr
    assert run.returncode == 0, f"check_nvcc.sh failed:\n{log[-8000:]}"
    # Every .cu was compiled with the shipped flags, then only diagnostics and includes.
    commands = [shlex.split(line[3:]) for line in log.splitlines()
                if line.startswith("== ") and line.endswith(".cu")]
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sorted(Path(c[-1]) for c in commands) == sources
    want = [*build_flags.nvcc_flags(), *build_flags.NVCC_CHECK_FLAGS,
            *build_flags.include_flags(ROOT)]
    for cmd in commands:
        assert cmd[1:-2] == want and cmd[-2] == "-c", cmd

    kernels = [(a, n, int(r), int(s), int(l), int(k)) for a, n, r, s, l, k in KERNEL.findall(log)]
    assert kernels, f"no ptxas report parsed:\n{log[-4000:]}"
    for arch in ("sm_80", "sm_90"):
        names = [n for a, n, *_ in kernels if a == arch]
        for op in ("logps_fwd_kernel", "logps_bwd_kernel"):
            # 3 dtypes (no fp64) x with/without entropy x 2 block sizes
            assert sum(op in n for n in names) == 12, (arch, op, names)
            assert not any(op + "Id" in n for n in names), "an fp64 kernel was built"
    bad = [k for k in kernels if k[3] or k[4] or k[5]]
    assert not bad, "kernels with spills or stack:\n" + "\n".join(map(str, bad))
    # cuobjdump's view of the same objects, when the tool is there (nvcc's or Triton's copy).
    locals_ = re.findall(r"LOCAL:(\d+)", log)
    if "Resource usage" in log:
        assert locals_ and all(v == "0" for v in locals_)
    # e.g. "sm_90 logps_fwd_kernel<f, entropy=1, block=512> regs=48"
    pretty = re.compile(r".*(logps_\w{3}_kernel)I(\w+?)Lb(\d)ELi(\d+)E.*")
    regs = sorted({(a, pretty.sub(r"\1<\2, entropy=\3, block=\4>", n), r)
                   for a, n, r, *_ in kernels})
    print("\n".join(f"{a} {n} regs={r}" for a, n, r in regs))
