#!/usr/bin/env bash
# The GPU machine's stack, rehearsed on CPU: a venv (.venv-rehearsal) with exactly its versions
# (python 3.12, torch 2.11.0 -- the registry's CUDA 13.0 build, several GB --, triton 3.6.0,
# transformers 5.17.0, the other packages of that image the peers need, and the peers' wheels
# from .whl/ when present), then
#   1. build and import the CUDA extension (FASTDPO_FORCE_CUDA=1, sm_90, nvcc from CUDA_HOME),
#   2. compile every Triton kernel variant the launchers can pick, for sm_90, at the GPU bench's
#      shapes, and report registers and spills (fastdpo inspect --variants --arch 90),
#   3. run the whole suite under the Triton interpreter: it must end with 0 failures.
# Heavy: not part of CI. Run it whenever kernels or the build change.
#   bash scripts/run gpu-rehearsal [pytest args...]     (REHEARSAL_PYTHON: a python 3.12)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${REHEARSAL_PYTHON:-$(command -v python3.12 || ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1)}"
V=.venv-rehearsal
LOG=.rehearsal
mkdir -p "$LOG"
declare -A status secs
run_step() {  # name, command...: run, log, record pass/fail and time, go on after a failure
  local name="$1"; shift
  local t0=$SECONDS
  echo "===== $name: $*"
  if "$@" 2>&1 | tee "$LOG/$name.log"; then status[$name]=pass; else status[$name]=fail; fi
  secs[$name]=$((SECONDS - t0))
  echo "===== $name: ${status[$name]} in ${secs[$name]} s"
}

setup() {
  [ -n "$PY" ] || { echo "no python 3.12 found (set REHEARSAL_PYTHON)"; return 1; }
  [ -x "$V/bin/python" ] || "$PY" -m venv "$V" || return 1
  "$V/bin/python" -m pip install -q --upgrade pip &&
  "$V/bin/python" -m pip install -q "torch==2.11.0" "triton==3.6.0" "transformers==5.17.0" \
    numpy pytest pytest-xdist pytest-timeout hypothesis psutil matplotlib pybind11 ninja \
    "setuptools<82" wheel accelerate pandas pyarrow xxhash pyyaml jinja2 fsspec requests tqdm ||
    return 1
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$V/bin/python" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || return 1
  fi
  "$V/bin/python" - <<'PY'
import torch, triton, transformers
print("torch", torch.__version__, "CUDA", torch.version.cuda, "| triton", triton.__version__,
      "| transformers", transformers.__version__)
assert torch.__version__.startswith("2.11.0") and torch.version.cuda, "not torch 2.11.0 (CUDA)"
assert triton.__version__ == "3.6.0" and transformers.__version__ == "5.17.0"
PY
}

build() {
  CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" FASTDPO_FORCE_CUDA=1 FASTDPO_CUDA_ARCHS=90 \
    MAX_JOBS="$(nproc)" "$V/bin/python" -m pip install -q --no-build-isolation --no-deps -e . &&
  "$V/bin/python" -c "import fastdpo.native.register as r; assert r.HAS_CUDA, 'no CUDA kernels'; print('CUDA extension imports; has_cuda =', r.HAS_CUDA)"
}

run_step setup setup
run_step build build
run_step aot_sm90 env TRITON_INTERPRET=0 "$V/bin/python" -m fastdpo.cli.main inspect \
  --variants --arch 90 --out "$LOG"
run_step suite "$V/bin/python" -m pytest tests --require-backends all -q -p no:cacheprovider \
  -n "$(nproc)" "$@"

echo "===== rehearsal summary (python 3.12, torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0)"
rc=0
for s in setup build aot_sm90 suite; do
  echo "  $s: ${status[$s]:-not run} (${secs[$s]:-0} s)"
  [ "${status[$s]:-fail}" = pass ] || rc=1
done
tail -1 "$LOG/suite.log" 2>/dev/null | sed 's/^/  suite: /'
echo "  logs: $LOG/"
exit $rc
