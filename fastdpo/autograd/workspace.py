"""Buffers a fused-head call may keep for the next one (:class:`Workspace`).

A DPO step through the fused head fills one chunk's logits buffer (the kept chunk on the native
CPU backend, the chunk loop's buffers elsewhere). Allocated afresh every step, a buffer that size
comes back from the OS as new pages, and on a CPU the first write to each page is a fault. A
:class:`Workspace` passed to every step keeps the buffers between calls instead: 1-3% of the fp32
DPO step at (N, H, V) = (1024, 512, 32000) and (2048, 256, 128256) on this project's 2-core CI
machine (``fastdpo[native,workspace]`` in ``benchmarks/results/lmhead-workspace/``), nothing
measurable at (4096, 1024, 128256). The price is explicit: they stay allocated (one chunk's
logits, ``nbytes``) until :meth:`release` or until the workspace is dropped. CUDA's caching
allocator already reuses device memory, so there it saves little; and there the lock below ends
when the call returns, not when its kernels finish, so calls on two CUDA streams must not share
one workspace.
"""

from __future__ import annotations

import threading

import torch


class Workspace:
    """Named buffers reused across fused-head calls, grown when a call needs more. One call at a
    time: a second call while one runs raises, because the two would share the buffers."""

    def __init__(self):
        self._bufs: dict = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def release(self) -> None:
        """Free every buffer (the next call allocates again)."""
        self._bufs.clear()

    def take(self, name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        """A 1-D ``(numel,)`` view of the buffer ``name`` for ``dtype`` on ``device``, reallocated
        only when the one held is smaller. Its contents are whatever the last call left."""
        key = (name, dtype, torch.device(device))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            self._bufs.pop(key, None)  # free the smaller one before allocating the larger
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def __enter__(self):
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this fastdpo.Workspace is in use by another call: give each "
                               "concurrent caller (thread, model) its own")
        return self

    def __exit__(self, *exc):
        self._lock.release()
        return False

    def __getstate__(self):  # a copy (deepcopy, pickle) starts empty: buffers are not state
        return {}

    def __setstate__(self, state):
        self.__init__()

    def __repr__(self) -> str:
        return f"Workspace({len(self._bufs)} buffers, {self.nbytes / 2**20:.1f} MiB)"


def check_workspace(workspace) -> None:
    if workspace is not None and not isinstance(workspace, Workspace):
        raise TypeError(f"workspace must be a fastdpo.Workspace or None, got "
                        f"{type(workspace).__name__}")


class _NoWorkspace:
    """Fresh buffers every call (no workspace given): the same interface."""

    def take(self, name, numel, dtype, device):
        return torch.empty(numel, dtype=dtype, device=device)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


FRESH = _NoWorkspace()
