#!/usr/bin/env bash
# Compile check of the CUDA layer (csrc/cuda) on a machine without a GPU (`make check-cuda`):
#
#  1. CMake with -DFWDCORE_CUDA=ON for sm_80 and sm_90: every csrc/cuda/*.cu compiled by nvcc with every
#     warning an error (host and device code), linked into libfwdcore.so with CUDA::cudart, and the
#     device-side test program (test_cuda_device) compiled and linked against it. A broken kernel fails.
#  2. csrc/cuda/bindings_cuda.cpp (fwdkernels._C_cuda) checked (-fsyntax-only, -Wall -Wextra -Werror)
#     against the installed torch's headers, the CUDA toolkit's and Python's.
#
# Nothing runs on a GPU here: the kernels' results are checked by the ctest test_cuda_emu (host SIMT
# emulation, part of `make test-cpp`) and, on a machine with a GPU, by test_cuda_device and
# tests/test_cuda_backend.py.
#
# Without nvcc (NVCC, PATH, CUDA_HOME, /usr/local/cuda) the check is skipped with a message (exit 0);
# without torch only step 2 is. Environment: NVCC, PYTHON (default .venv/bin/python, then python3),
# CHECK_CUDA_BUILD (build directory, default build/cuda-check), CHECK_CUDA_ARCHS (default "80;90"),
# CHECK_CUDA_VERBOSE=1 (ptxas resource usage: registers, shared memory, spills).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "check-cuda: $*"; }

nvcc="${NVCC:-}"
if [ -z "$nvcc" ]; then
  for c in "$(command -v nvcc 2>/dev/null || true)" "${CUDA_HOME:-}/bin/nvcc" "${CUDA_PATH:-}/bin/nvcc" \
           /usr/local/cuda/bin/nvcc; do
    if [ -n "$c" ] && [ -x "$c" ]; then nvcc="$c"; break; fi
  done
fi
if [ -z "$nvcc" ] || ! "$nvcc" --version > /dev/null 2>&1; then
  say "SKIPPED: nvcc not found (set NVCC=/path/to/nvcc, CUDA_HOME, or put nvcc on PATH);" \
      "the CUDA kernels in csrc/cuda were NOT compile-checked"
  exit 0
fi
build="${CHECK_CUDA_BUILD:-build/cuda-check}"
archs="${CHECK_CUDA_ARCHS:-80;90}"
say "$("$nvcc" --version | tail -n 2 | head -n 1) ($nvcc), architectures $archs"

# The toolkit's include directory, as nvcc itself resolves it.
cuda_inc="$("$nvcc" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)"
if [ -z "$cuda_inc" ] || [ ! -f "$cuda_inc/cuda_runtime.h" ]; then
  cuda_inc="$(dirname "$(dirname "$nvcc")")/include"
fi

# 1. CMake: libraries and the device test, with every warning an error.
start=$SECONDS
cuda_flags="-Werror all-warnings -Xcompiler=-Wall,-Wextra,-Werror"
if [ "${CHECK_CUDA_VERBOSE:-0}" = 1 ]; then cuda_flags="$cuda_flags -Xptxas=-v"; fi
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DFWDCORE_CUDA=ON -DFWDCORE_CUDA_EMULATE=OFF \
  -DCMAKE_CUDA_COMPILER="$nvcc" -DCMAKE_CUDA_ARCHITECTURES="$archs" -DCMAKE_CUDA_FLAGS="$cuda_flags" > "$build.configure.log" 2>&1 ||
  { cat "$build.configure.log"; say "FAILED: cmake configure with FWDCORE_CUDA=ON"; exit 1; }
cmake --build "$build" -j "${MAX_JOBS:-2}" --target fwdcore_shared test_cuda_device ||
  { say "FAILED: the CUDA build (see the errors above)"; exit 1; }
n_cu=$(ls csrc/cuda/*.cu | wc -l)
say "OK: $n_cu .cu file(s) compiled for sm_${archs//;/ and sm_}, libfwdcore.so and test_cuda_device linked ($((SECONDS - start)) s)"

# 2. The torch bindings against torch's headers.
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
if ! torch_inc="$("$py" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))' 2>/dev/null)"; then
  say "SKIPPED: csrc/cuda/bindings_cuda.cpp (no torch for $py)"
  exit 0
fi
py_inc="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
start=$SECONDS
isys=()
for d in $torch_inc "$py_inc" "$cuda_inc"; do isys+=(-isystem "$d"); done
# A CPU build of torch ships c10/cuda's headers but not their generated cuda_cmake_macros.h (which only
# defines C10_CUDA_BUILD_SHARED_LIBS): C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it.
"${CXX:-g++}" -fsyntax-only -std=c++17 -Wall -Wextra -Werror -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
  -DTORCH_EXTENSION_NAME=_C_cuda -DTORCH_API_INCLUDE_EXTENSION_H "${isys[@]}" -Icsrc/core -Icsrc/cuda \
  csrc/cuda/bindings_cuda.cpp || { say "FAILED: csrc/cuda/bindings_cuda.cpp"; exit 1; }
say "OK: csrc/cuda/bindings_cuda.cpp against torch $("$py" -c 'import torch; print(torch.__version__)') ($((SECONDS - start)) s)"
