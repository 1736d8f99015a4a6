"""Build script: packages plus the native extension ``fastdpo.native._C`` (sources in csrc/).

Metadata lives in pyproject.toml. The extension is compiled against the torch already installed, so
build without isolation (an isolated build would import a different torch, or none):

    pip install --no-build-isolation -e .

Environment switches:
    FASTDPO_NO_NATIVE=1    install without the extension (the native backend then reports why)
    FASTDPO_NO_CUDA=1      CPU kernels only, even with a CUDA toolchain and a CUDA torch
    FASTDPO_FORCE_CUDA=1   fail unless the CUDA kernels can be built (CUDA torch + nvcc)
    FASTDPO_CUDA_ARCHS     ';'-separated compute capabilities, default "80;90" (PTX of the last)
    MAX_JOBS               parallel compile jobs (ninja)
"""

import os

from setuptools import setup

CPU_SOURCES = [
    "csrc/registration.cpp",
    "csrc/ops.cpp",
    "csrc/cpu/logps_avx2.cpp",
    "csrc/cpu/logps_generic.cpp",
]
CUDA_SOURCES = [
    "csrc/cuda/ops_cuda.cpp",
    "csrc/cuda/logps_fwd.cu",
    "csrc/cuda/logps_bwd.cu",
]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _cuda_arch_flags() -> list:
    archs = os.environ.get("FASTDPO_CUDA_ARCHS", "80;90").split(";")
    archs = [a.strip() for a in archs if a.strip()]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def _want_cuda(torch, cuda_home) -> bool:
    if _flag("FASTDPO_NO_CUDA"):
        return False
    ok = torch.version.cuda is not None and cuda_home is not None
    if _flag("FASTDPO_FORCE_CUDA") and not ok:
        raise RuntimeError(
            "FASTDPO_FORCE_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch {torch.__version__} is {'a CUDA' if torch.version.cuda else 'a CPU-only'} "
            "build and the CUDA toolkit is "
            f"{'at ' + cuda_home if cuda_home else 'not found (CUDA_HOME)'}")
    return ok


def native_build():
    """(ext_modules, cmdclass) for the C++/CUDA extension."""
    if _flag("FASTDPO_NO_NATIVE"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError(
            "fastdpo's native extension is compiled against the installed torch, which this build "
            "cannot import. Install torch first, then `pip install --no-build-isolation -e .` "
            "(or set FASTDPO_NO_NATIVE=1 to install without the native backend).") from exc

    root = os.path.dirname(os.path.abspath(__file__))
    include_dirs = [os.path.join(root, "csrc", "include"), os.path.join(root, "csrc")]
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    kwargs = dict(include_dirs=include_dirs, extra_link_args=["-fopenmp"])
    if _want_cuda(torch, CUDA_HOME):
        nvcc = ["-O3", "-lineinfo", "-DFASTDPO_WITH_CUDA"] + _cuda_arch_flags()
        ext = CUDAExtension(
            "fastdpo.native._C", CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx + ["-DFASTDPO_WITH_CUDA"], "nvcc": nvcc}, **kwargs)
    else:
        ext = CppExtension("fastdpo.native._C", CPU_SOURCES, extra_compile_args={"cxx": cxx},
                           **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
