#!/usr/bin/env bash
# `make test-arm`: the torch-free core (csrc/core) on aarch64, from an x86-64 Debian/Ubuntu machine.
#   1. installs g++-aarch64-linux-gnu and qemu-user with apt-get when missing (sudo when not root);
#   2. builds the host golden_dump (build/arm-host) and writes the host's golden dump of every C API
#      entry point on fixed inputs;
#   3. cross-builds with cmake/aarch64-linux-gnu.cmake (build/arm) and runs the whole ctest suite under
#      qemu-aarch64 (CMAKE_CROSSCOMPILING_EMULATOR), golden_vs_reference included;
#   4. compares the aarch64 dump with the host's: Philox words, seeds and Rademacher values bit for bit,
#      float results within the per-quantity tolerance written in the dump.
# Environment: MAX_JOBS (build and ctest parallelism, default: nproc).
set -euo pipefail
cd "$(dirname "$0")/.."

JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
HOST_DIR=build/arm-host
ARM_DIR=build/arm
SYSROOT=/usr/aarch64-linux-gnu

have_tools() {
  command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 && command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 &&
    command -v qemu-aarch64 >/dev/null 2>&1 && [ -d "$SYSROOT/lib" ]
}

if ! have_tools; then
  pkgs="g++-aarch64-linux-gnu qemu-user"
  if [ "$(id -u)" = 0 ]; then
    SUDO=""
  elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "test-arm: need $pkgs (aarch64 cross compiler and qemu-aarch64); not root and no sudo:" >&2
    echo "  install them as root: apt-get install -y $pkgs" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "test-arm: need an aarch64-linux-gnu cross g++ and qemu-aarch64 (Debian: $pkgs); no apt-get here" >&2
    exit 1
  fi
  echo "test-arm: installing $pkgs"
  export DEBIAN_FRONTEND=noninteractive
  if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; }; then
    echo "test-arm: 'apt-get install $pkgs' failed${SUDO:+ (with sudo)}; install them and run again" >&2
    exit 1
  fi
  have_tools || { echo "test-arm: $pkgs installed, but aarch64-linux-gnu-g++ / qemu-aarch64 still missing" >&2; exit 1; }
fi

t0=$(date +%s)
echo "== host golden dump ($HOST_DIR)"
cmake -S . -B "$HOST_DIR" -DCMAKE_BUILD_TYPE=Release -DFWDCORE_TEST_INSTALL=OFF > /dev/null
cmake --build "$HOST_DIR" -j"$JOBS" --target golden_dump > /dev/null
HOST_DUMP="$PWD/$HOST_DIR/golden-host.txt"
"$HOST_DIR/csrc/core/tests/golden_dump" dump "$HOST_DUMP"

echo "== aarch64 cross build ($ARM_DIR)"
cmake -S . -B "$ARM_DIR" -DCMAKE_BUILD_TYPE=Release -DCMAKE_TOOLCHAIN_FILE="$PWD/cmake/aarch64-linux-gnu.cmake" \
  -DFWDCORE_GOLDEN_REF="$HOST_DUMP" > /dev/null
cmake --build "$ARM_DIR" -j"$JOBS" > /dev/null

echo "== ctest under qemu-aarch64"
OMP_WAIT_POLICY=PASSIVE ctest --test-dir "$ARM_DIR" --output-on-failure -j"$JOBS"

echo "== golden: host vs aarch64"
"$HOST_DIR/csrc/core/tests/golden_dump" compare "$HOST_DUMP" "$ARM_DIR/csrc/core/tests/golden.txt"
echo "test-arm: ok ($(( $(date +%s) - t0 ))s)"
