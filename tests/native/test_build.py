"""The extension as built: kernels registered for the schemas, the AVX2 code really AVX2, and a
clear ImportError when the extension is missing."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdpo.native
from fastdpo import backends


def test_loads_and_registers_cpu_kernels():
    st = backends.status("native")
    assert st.loaded, st.reason
    from fastdpo.native import _C, register

    assert isinstance(register.HAS_CUDA, bool) and register.HAS_CUDA == _C.has_cuda()
    for op in ("native_logps_fwd", "native_logps_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdpo::{op}", "CPU")
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdpo::{op}", "CUDA")
        assert has_cuda == register.HAS_CUDA
    assert backends.resolve("native", torch.device("cpu"), torch.float32) == "native"
    assert backends.resolve("auto", torch.device("cpu"), torch.bfloat16) == "native"


def test_avx2_kernels_are_avx2_code():
    from fastdpo.native import _C

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not found")
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", _C.__file__], capture_output=True,
                         text=True, check=True).stdout
    fma_ymm = sum(1 for line in out.splitlines() if "vfmadd" in line and "%ymm" in line)
    assert fma_ymm > 50, fma_ymm


def test_missing_extension_raises_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastdpo.native._C", None)  # as if never built
    monkeypatch.delattr(fastdpo.native, "_C", raising=False)
    path = Path(fastdpo.native.__file__).with_name("register.py")
    spec = importlib.util.spec_from_file_location("fastdpo.native._register_probe", path)
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        spec.loader.exec_module(module)
