"""Fixtures of the Triton kernel tests: the kernel modules, when the backend runs here (a
required backend that cannot load fails instead of skipping)."""

import pytest

from backend_checks import backend_or_skip


@pytest.fixture(scope="module")
def K(request, device):
    backend_or_skip(request, "triton", device)
    from fastdpo.triton import logps

    return logps


@pytest.fixture(scope="module")
def TL(request, device):
    backend_or_skip(request, "triton", device)
    import fastdpo.triton.linear as mod

    return mod
