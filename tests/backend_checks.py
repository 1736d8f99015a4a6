"""Whether a backend runs here, failing (not skipping) when ``--require-backends`` names it.

A plain module rather than conftest fixtures so that test modules and sub-folder conftests import
it by name (tests/ is on the path, as for tolerance.py).
"""

import pytest

from fastdpo import backends

ALL = ("torch", "triton", "native")


def required(config):
    req = config.getoption("--require-backends")
    return ALL if req == "all" else tuple(x for x in req.split(",") if x)


def backend_or_skip(request, name, device):
    why = backends.device_reason(name, device)
    if why:
        if name in required(request.config):
            pytest.fail(f"required backend {name!r} unavailable: {why}")
        pytest.skip(f"backend {name!r} unavailable: {why}")
    return name
