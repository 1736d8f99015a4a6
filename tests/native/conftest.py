"""Fixtures of the native-backend tests: the loaded extension, and each CPU kernel set in turn."""

import pytest

from fastdpo import backends


@pytest.fixture(scope="session")
def C():
    st = backends.status("native")
    assert st.loaded, f"native extension failed to load: {st.reason}"
    from fastdpo.native import _C

    return _C


@pytest.fixture(params=["avx2", "generic"])
def kernel(request, C):
    """Pins the AVX2 or the scalar CPU kernels for one test."""
    if request.param == "avx2" and not C.avx2_supported():
        pytest.skip("this CPU has no AVX2/FMA/F16C (the scalar kernels are tested instead)")
    C.set_cpu_kernel("auto" if request.param == "avx2" else "generic")
    assert C.cpu_kernel() == request.param
    yield request.param
    C.set_cpu_kernel("auto")
