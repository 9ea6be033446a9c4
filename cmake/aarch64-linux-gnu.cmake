# Cross-compiling fwdcore (or a project that uses it) for 64-bit ARM Linux with Debian's cross toolchain
# (apt-get install g++-aarch64-linux-gnu qemu-user):
#
#   cmake -S . -B build/arm -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake
#   cmake --build build/arm -j && ctest --test-dir build/arm     # tests run under qemu-aarch64
#
# Overridable cache variables: FWDCORE_CROSS_PREFIX (compiler prefix, default aarch64-linux-gnu-),
# FWDCORE_CROSS_SYSROOT (target root with the libraries, default /usr/aarch64-linux-gnu).
# CMAKE_CROSSCOMPILING_EMULATOR is qemu-aarch64 -L <sysroot> when qemu-aarch64 is found on PATH, so
# ctest (and add_test / add_custom_command) run the aarch64 binaries on an x86 host.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(FWDCORE_CROSS_PREFIX "aarch64-linux-gnu-" CACHE STRING "Prefix of the aarch64 cross compilers")
set(FWDCORE_CROSS_SYSROOT "/usr/aarch64-linux-gnu" CACHE PATH "aarch64 target root (libraries, loader)")

set(CMAKE_C_COMPILER "${FWDCORE_CROSS_PREFIX}gcc")
set(CMAKE_CXX_COMPILER "${FWDCORE_CROSS_PREFIX}g++")

# Libraries and headers come from the target root (and the install prefix); programs from the host.
list(APPEND CMAKE_FIND_ROOT_PATH "${FWDCORE_CROSS_SYSROOT}")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# BOTH: find_package(fwdcore) must also find a package installed under a host path (CMAKE_PREFIX_PATH).
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

if(NOT CMAKE_CROSSCOMPILING_EMULATOR)
  find_program(FWDCORE_QEMU_AARCH64 NAMES qemu-aarch64 qemu-aarch64-static)
  if(FWDCORE_QEMU_AARCH64)
    set(CMAKE_CROSSCOMPILING_EMULATOR "${FWDCORE_QEMU_AARCH64};-L;${FWDCORE_CROSS_SYSROOT}")
  endif()
endif()
