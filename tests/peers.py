"""Optional peers (trl, liger-kernel, cut-cross-entropy) that some test modules compare against.

They are test dependencies here, so CI (``CI`` set) fails when one is missing; on a machine where
they are optional (the offline GPU box without carried wheels) the module is skipped. Only a
missing package skips: an ImportError raised from inside an installed one still fails.
"""

import importlib.util
import os

import pytest


def require(*names: str) -> None:
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if not missing:
        return
    msg = f"optional peer(s) not installed: {', '.join(missing)}"
    if os.environ.get("CI", "") not in ("", "0", "false"):
        pytest.fail(msg + " (CI installs them: see pyproject.toml [test])", pytrace=False)
    pytest.skip(msg, allow_module_level=True)
