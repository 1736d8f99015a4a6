#!/usr/bin/env bash
# Compile every CUDA source with exactly the flags of the shipped build (from
# fastdpo/native/build_flags.py, as setup.py; FASTDPO_CUDA_ARCHS as there) plus warnings as errors,
# no GPU and no CUDA torch needed: the .cu files are torch-free (kernels, CUB, csrc/include). Then
# print one line per kernel and architecture from ptxas (registers, spills, stack) and cuobjdump's
# resource usage. Finally
# the torch glue of the CUDA build (ops_cuda.cpp, registration.cpp with FASTDPO_WITH_CUDA) is
# syntax-checked with the host compiler against the installed torch's headers (a CPU wheel ships
# the c10/cuda headers, without the CMake-generated macros file, hence C10_CUDA_NO_CMAKE_...).
#
#   csrc/cuda/check_nvcc.sh [OUT_DIR]      (NVCC, CUOBJDUMP and PYTHON override the tools)
#
# Output lines: "KERNEL <arch> <mangled name> regs=<n> spill_stores=<bytes> spill_loads=<bytes>
# stack=<bytes>", then the cuobjdump dump. Exit status is nvcc's (non-zero on any error/warning).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
csrc="$(dirname "$here")"
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
NVCC="${NVCC:-nvcc}"
PYTHON="${PYTHON:-python}"
if [[ -z "${CUOBJDUMP:-}" ]]; then
  CUOBJDUMP="$(command -v cuobjdump || true)"
  if [[ -z "$CUOBJDUMP" ]]; then
    CUOBJDUMP="$("$PYTHON" -c 'import triton, os; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"
  fi
fi

# The shipped device flags, then the diagnostics (warnings as errors, ptxas -v) and the includes.
build_flags="$(dirname "$csrc")/fastdpo/native/build_flags.py"
mapfile -t shipped < <("$PYTHON" "$build_flags" nvcc)
mapfile -t check < <("$PYTHON" "$build_flags" check)
if [[ ${#shipped[@]} -eq 0 || ${#check[@]} -eq 0 ]]; then
  echo "no flags from $build_flags" >&2
  exit 1
fi
flags=("${shipped[@]}" "${check[@]}" -I"$csrc/include" -I"$csrc")

status=0
# The sources compile in parallel (nvcc is single-threaded per file); reports follow in order.
pids=()
for cu in "$here"/*.cu; do
  name="$(basename "$cu" .cu)"
  "$NVCC" "${flags[@]}" -c "$cu" -o "$out/$name.o" >"$out/$name.ptxas.log" 2>&1 &
  pids+=($!)
done
i=0
for cu in "$here"/*.cu; do
  name="$(basename "$cu" .cu)"
  echo "== $NVCC ${flags[*]} -c $cu"
  if ! wait "${pids[$i]}"; then
    cat "$out/$name.ptxas.log"
    status=1
    i=$((i + 1))
    continue
  fi
  i=$((i + 1))
  # ptxas prints, per kernel: "Compiling entry function 'NAME' for 'sm_XX'", then the stack/spill
  # line, then "Used N registers".
  awk '
    /Compiling entry function/ { match($0, /function .[^'"'"']*/); fn = substr($0, RSTART + 10, RLENGTH - 10);
                                 match($0, /for .sm_[0-9]+/); arch = substr($0, RSTART + 5, RLENGTH - 5) }
    /bytes stack frame/ { split($0, a, /[ ,]+/); for (i = 1; i <= length(a); i++) {
                            if (a[i] == "stack") stack = a[i-2]; if (a[i] == "stores") st = a[i-3];
                            if (a[i] == "loads") ld = a[i-3] } }
    /Used [0-9]+ registers/ { match($0, /Used [0-9]+/); regs = substr($0, RSTART + 5, RLENGTH - 5);
                              if (fn != "") printf "KERNEL %s %s regs=%s spill_stores=%s spill_loads=%s stack=%s\n", arch, fn, regs, st, ld, stack;
                              fn = "" }
  ' "$out/$name.ptxas.log"
  if [[ -n "$CUOBJDUMP" && -x "$CUOBJDUMP" ]]; then
    "$CUOBJDUMP" --dump-resource-usage "$out/$name.o"
  fi
done

# nvcc may be a wrapper script: ask it where its toolkit is.
cuda_home="${CUDA_HOME:-$("$NVCC" --dryrun -c -x cu /dev/null -o "$out/probe.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)}"
torch_inc="$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))')"
py_inc="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
glue=(-std=c++20 -fsyntax-only -Wall -Wextra -Werror -DFASTDPO_WITH_CUDA
      -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCH_EXTENSION_NAME=_C -I"$csrc/include" -I"$csrc")
for d in $torch_inc "$py_inc" "$cuda_home/include"; do glue+=(-isystem "$d"); done
for src in "$here/ops_cuda.cpp" "$csrc/registration.cpp"; do
  echo "== ${CXX:-c++} -fsyntax-only (CUDA build glue) $src"
  if ! "${CXX:-c++}" "${glue[@]}" "$src"; then status=1; fi
done
exit $status
