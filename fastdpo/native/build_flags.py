"""The one definition of how the native CUDA kernels are compiled.

setup.py (which loads this file by path, before the package is importable), the compile check
``csrc/cuda/check_nvcc.sh`` (``python fastdpo/native/build_flags.py nvcc``) and ``fastdpo inspect``
all take their nvcc flags from here, so the registers and spills they report are those of the
shipped build. Standard library only: nothing of fastdpo or torch is imported.

torch's ``BuildExtension`` adds ``COMMON_NVCC_FLAGS`` (the half/bfloat16 defines and
``--expt-relaxed-constexpr``) and ``-fPIC`` to every ``.cu`` it compiles, and ``-std=c++20``
unless a standard is given; they are listed here too, so that a compile outside setup.py
(the check, ``inspect``) reproduces the build (repeating them in the build changes nothing).
"""

from __future__ import annotations

import os
import sys

DEFAULT_ARCHS = ("80", "90")

# Code generation flags of every .cu file, without the target architectures.
NVCC_FLAGS = (
    "-std=c++20",
    "-O3",
    "-lineinfo",
    "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "-DFASTDPO_WITH_CUDA",
    "-Xcompiler",
    "-fPIC",
)

# Diagnostics only (the compile check): they change no generated code.
NVCC_CHECK_FLAGS = ("-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror", "-Xptxas",
                    "-v")


def archs(env=None) -> list[str]:
    """Compute capabilities to build: ``FASTDPO_CUDA_ARCHS`` (';'-separated) or 80 and 90."""
    env = os.environ if env is None else env
    raw = env.get("FASTDPO_CUDA_ARCHS", ";".join(DEFAULT_ARCHS))
    out = [a.strip() for a in raw.split(";") if a.strip()]
    if not out or not all(a.isdigit() for a in out):
        raise ValueError(f"FASTDPO_CUDA_ARCHS must be ';'-separated numbers like '80;90', "
                         f"got {raw!r}")
    return out


def arch_flags(arch_list) -> list[str]:
    """SASS for each architecture, plus PTX of the last (for newer GPUs)."""
    arch_list = list(arch_list)
    flags = []
    for a in arch_list:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{arch_list[-1]},code=compute_{arch_list[-1]}"]
    return flags


def include_flags(root) -> list[str]:
    """The .cu files are torch-free: the csrc/ headers are all they include."""
    root = os.fspath(root)
    return [f"-I{os.path.join(root, 'csrc', 'include')}", f"-I{os.path.join(root, 'csrc')}"]


def nvcc_flags(arch_list=None) -> list[str]:
    """Everything setup.py passes to nvcc: code generation flags and architectures."""
    return [*NVCC_FLAGS, *arch_flags(archs() if arch_list is None else arch_list)]


def main(argv) -> int:
    """``nvcc``: the shipped flags, one per line (check_nvcc.sh reads them); ``check``: the
    diagnostic flags the compile check adds."""
    what = argv[1] if len(argv) > 1 else "nvcc"
    if what == "nvcc":
        print("\n".join(nvcc_flags()))
    elif what == "check":
        print("\n".join(NVCC_CHECK_FLAGS))
    else:
        print(f"usage: {argv[0]} [nvcc|check]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
