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

from fastdpo import backends  # noqa: E402

ALL = ("torch", "triton", "native")


def pytest_addoption(parser):
    parser.addoption("--require-backends", default="torch",
                     help="comma list of backends that must load ('all' for every one)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: larger shapes; still run in CI")


def required(config):
    req = config.getoption("--require-backends")
    return ALL if req == "all" else tuple(x for x in req.split(",") if x)


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_or_skip(request, name, device):
    why = backends.device_reason(name, device)
    if why:
        if name in required(request.config):
            pytest.fail(f"required backend {name!r} unavailable: {why}")
        pytest.skip(f"backend {name!r} unavailable: {why}")
    return name


@pytest.fixture(params=ALL)
def backend(request, device):
    return backend_or_skip(request, request.param, device)
