"""Child process of the CPU memory profiler: one case in a fresh interpreter, one JSON line out.

``python -m fastdpo.bench._memory_child '{"case": {...}, "impl": "eager", "device": "cpu"}'``
"""

from __future__ import annotations

import json
import sys


def main(argv) -> int:
    spec = json.loads(argv[0])
    from fastdpo.bench.impls import by_name
    from fastdpo.bench.memory import measure_case
    from fastdpo.bench.workloads import Case, unavailable

    case = Case(**spec["case"])
    impl = by_name([spec["impl"]])[0]
    why = unavailable(impl, case, spec["device"])
    if why:
        res = {"status": "unavailable", "reason": why}
    else:
        try:
            res = {"status": "ok", **measure_case(
                case, impl, spec["device"], saved=spec.get("saved", True),
                small_warmup=spec.get("small_warmup", False))}
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            res = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
