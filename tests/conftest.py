"""Test configuration: which backends run, and the failure (not skip) when a required one can't.

Without a GPU the Triton kernels run under the interpreter on CPU tensors; the variable must be set
before Triton is imported, hence here. ``--require-backends`` (CI passes ``all``) turns a backend
that fails to load into a test failure instead of a skip.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from backend_checks import ALL, backend_or_skip  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--require-backends", default="torch",
                     help="comma list of backends that must load ('all' for every one)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: larger shapes; still run in CI")


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=ALL)
def backend(request, device):
    return backend_or_skip(request, request.param, device)


@pytest.fixture
def kept_buffers(monkeypatch):
    """The data pointer of each native kept-chunk buffer, as the calls take them."""
    from fastdpo.autograd import linear_native

    ptrs = []
    real = linear_native.KeptChunks.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        ptrs.append(self.keep.data_ptr())

    monkeypatch.setattr(linear_native.KeptChunks, "__init__", spy)
    return ptrs
