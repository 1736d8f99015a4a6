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

import importlib.util
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_flags():
    """fastdpo/native/build_flags.py, by path: the package is not importable while it is built."""
    path = os.path.join(ROOT, "fastdpo", "native", "build_flags.py")
    spec = importlib.util.spec_from_file_location("_fastdpo_build_flags", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CPU_SOURCES = [
    "csrc/registration.cpp",
    "csrc/ops.cpp",
    "csrc/cpu/logps_avx2.cpp",
    "csrc/cpu/logps_generic.cpp",
    "csrc/cpu/linear_cpu.cpp",
]
CUDA_SOURCES = [
    "csrc/cuda/ops_cuda.cpp",
    "csrc/cuda/logps_fwd.cu",
    "csrc/cuda/logps_bwd.cu",
]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


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

    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    # -ffp-contract=off: GCC would otherwise fuse a * b + c into an fma where it sees fit, so the
    # same formula could round differently in two instantiations (entropy on/off) of a kernel.
    cxx = ["-O3", "-ffp-contract=off", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    kwargs = dict(include_dirs=include_dirs, extra_link_args=["-fopenmp"])
    if _want_cuda(torch, CUDA_HOME):
        # The one definition of the nvcc flags (also used by csrc/cuda/check_nvcc.sh and
        # `fastdpo inspect`); it names the architectures, so BuildExtension adds none of its own.
        nvcc = _build_flags().nvcc_flags()
        ext = CUDAExtension(
            "fastdpo.native._C", CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx + ["-DFASTDPO_WITH_CUDA"], "nvcc": nvcc}, **kwargs)
    else:
        ext = CppExtension("fastdpo.native._C", CPU_SOURCES, extra_compile_args={"cxx": cxx},
                           **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
