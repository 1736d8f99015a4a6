"""Importing this registers the native backend's kernels (or raises ImportError saying why not).

``HAS_CUDA`` tells whether the extension was compiled with its CUDA kernels.
"""

from __future__ import annotations

from .. import ops  # noqa: F401  (the schemas must exist before the kernels attach to them)

try:
    from . import _C
except ImportError as exc:  # not built, or built against another torch
    raise ImportError(
        "fastdpo's native extension (fastdpo.native._C) could not be loaded: "
        f"{exc}. Build it against the installed torch with "
        "`pip install --no-build-isolation -e .` from the fastdpo source tree."
    ) from exc

HAS_CUDA: bool = bool(_C.has_cuda())
