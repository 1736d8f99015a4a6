"""Reading compiled GPU code without a GPU: resource usage and SASS of a cubin.

Uses the CUDA binary utilities Triton ships (``cuobjdump``, ``nvdisasm``, ``ptxas`` under
``triton/backends/nvidia/bin``) or the CUDA toolkit's. Loops are found from backward branches in
the SASS (``BRA`` to a lower address); the memory instructions inside them are the streaming loop's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)", re.M)
_RES = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")  # plain, cp.async, TMA loads
GLOBAL_STORES = ("STG", "UTMASTG", "RED", "ATOMG")
WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "8": 8, "16": 16, "32": 32, "64": 64,
          "128": 128, "256": 256}


def tool(name: str) -> str | None:
    """Path of a CUDA binary utility: Triton's bundled copy first, then the toolkit's."""
    try:
        import triton

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if p.exists():
            return str(p)
    except ImportError:
        pass
    for d in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        p = Path(d) / "bin" / name
        if d and p.exists():
            return str(p)
    return shutil.which(name)


@dataclass
class Instr:
    addr: int
    pred: str
    op: str  # full opcode with modifiers, e.g. "LDG.E.128"
    text: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    @property
    def width_bits(self) -> int:
        """Access width of a memory instruction (32 when the opcode names none)."""
        bits = [WIDTHS[m] for m in self.op.split(".")[1:] if m in WIDTHS]
        return max(bits) if bits else 32


@dataclass
class KernelSass:
    name: str
    instructions: int
    loops: list = field(default_factory=list)  # [(start, end)] byte addresses
    global_loads: dict = field(default_factory=dict)  # width -> count, whole kernel
    global_stores: dict = field(default_factory=dict)
    loop_loads: dict = field(default_factory=dict)  # width -> count, inside loops
    loop_stores: dict = field(default_factory=dict)
    local_ops: int = 0  # LDL/STL: spills (or local arrays)
    streaming_loops: int = 0  # loops that touch global memory
    scope: str = "loops"  # where loop_* were taken: "loops", or "whole kernel (no loop)"
    loop_detail: list = field(default_factory=list)  # per loop: range, innermost, widths
    widest_loop_load: int | None = None
    narrowest_loop_load: int | None = None
    widest_loop_store: int | None = None
    narrowest_loop_store: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_instructions(text: str) -> list[Instr]:
    out = []
    for m in _LINE.finditer(text):
        body = m.group(2).strip()
        pred = ""
        if body.startswith("@"):
            pred, _, body = body.partition(" ")
            body = body.strip()
        op = body.split()[0] if body else ""
        out.append(Instr(int(m.group(1), 16), pred, op, body))
    return out


def _loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    loops = []
    for ins in instrs:
        if ins.base in ("BRA", "JMP"):
            m = re.search(r"0x([0-9a-f]+)", ins.text)
            if m:
                target = int(m.group(1), 16)
                if target < ins.addr:  # backward branch; BRA-to-self is the end padding
                    loops.append((target, ins.addr))
    return sorted(set(loops))


def analyse(name: str, instrs: list[Instr]) -> KernelSass:
    loops = _loops(instrs)

    def in_loop(a):
        return any(s <= a <= e for s, e in loops)

    k = KernelSass(name=name, instructions=len(instrs), loops=loops)
    gl, gs, ll, ls = Counter(), Counter(), Counter(), Counter()
    touching = set()
    for ins in instrs:
        if ins.base in GLOBAL_LOADS:
            gl[ins.width_bits] += 1
            if in_loop(ins.addr):
                ll[ins.width_bits] += 1
                touching.update(i for i, (s, e) in enumerate(loops) if s <= ins.addr <= e)
        elif ins.base in GLOBAL_STORES:
            gs[ins.width_bits] += 1
            if in_loop(ins.addr):
                ls[ins.width_bits] += 1
                touching.update(i for i, (s, e) in enumerate(loops) if s <= ins.addr <= e)
        elif ins.base in ("LDL", "STL"):
            k.local_ops += 1
    for i, (s0, e0) in enumerate(loops):
        inner = not any(j != i and s0 <= s1 and e1 <= e0 for j, (s1, e1) in enumerate(loops))
        lw = Counter(x.width_bits for x in instrs if s0 <= x.addr <= e0 and x.base in GLOBAL_LOADS)
        sw = Counter(x.width_bits for x in instrs
                     if s0 <= x.addr <= e0 and x.base in GLOBAL_STORES)
        k.loop_detail.append({"start": s0, "end": e0, "innermost": inner, "loads": dict(lw),
                              "stores": dict(sw)})
    k.global_loads, k.global_stores = dict(gl), dict(gs)
    if not touching:  # one tile per program (no loop): the whole kernel is the streaming part
        ll, ls, k.scope = gl, gs, "whole kernel (no loop)"
    k.loop_loads, k.loop_stores = dict(ll), dict(ls)
    k.streaming_loops = len(touching)
    if ll:
        k.widest_loop_load, k.narrowest_loop_load = max(ll), min(ll)
    if ls:
        k.widest_loop_store, k.narrowest_loop_store = max(ls), min(ls)
    return k


def sass_of_cubin(cubin: Path) -> dict[str, KernelSass]:
    """Per-function SASS analysis of ``cubin`` (``cuobjdump -sass`` gives branch targets as
    addresses)."""
    exe = tool("cuobjdump")
    if exe is None:
        raise RuntimeError("cuobjdump not found (it ships with triton's NVIDIA backend)")
    text = subprocess.run([exe, "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    parts = _FUNC.split(text)
    out = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        out[name] = analyse(name, parse_instructions(body))
    return out


def resource_usage(cubin: Path) -> dict[str, dict]:
    """``cuobjdump --dump-resource-usage``: registers, stack, shared, local bytes per function."""
    exe = tool("cuobjdump")
    text = subprocess.run([exe, "--dump-resource-usage", str(cubin)], capture_output=True,
                          text=True, check=True).stdout
    return {m.group(1): {"registers": int(m.group(2)), "stack_bytes": int(m.group(3)),
                         "static_shared_bytes": int(m.group(4)), "local_bytes": int(m.group(5))}
            for m in _RES.finditer(text)}


_PTXAS_FN = re.compile(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes "
                       r"spill stores, (\d+) bytes spill loads")


def ptxas_verbose(ptxas: str, ptx: Path, arch: str) -> dict[str, dict]:
    """Spill bytes per function from ``ptxas -v`` (the figures the driver would report)."""
    p = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(ptx), "-o", os.devnull],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"ptxas failed: {p.stderr.strip()[-300:]}")
    return {m.group(1): {"stack_frame_bytes": int(m.group(2)), "spill_store_bytes": int(m.group(3)),
                         "spill_load_bytes": int(m.group(4))}
            for m in _PTXAS_FN.finditer(p.stderr + p.stdout)}
