"""Build fwdkernels._C (the CPU kernels, from csrc/core + csrc/torch) and, where torch has CUDA,
fwdkernels._C_cuda (csrc/cuda).

Install with:  pip install --no-build-isolation -e .
(build isolation would fetch another torch; pin torch first, e.g. pip install torch==2.13.0).
Environment: FWDLLM_SKIP_CUDA_BUILD=1 skips the CUDA extension; FWDLLM_CUDA_ARCHS="80;90" picks its
architectures; MAX_JOBS limits parallel compile jobs.
"""
import glob
import os
import platform

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover
    raise SystemExit(
        "fwdllm's build needs torch installed first (pip install torch==2.13.0), and pip's "
        "--no-build-isolation so that the build sees it."
    ) from e

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def cpu_flags():
    # -fno-trapping-math: lets GCC vectorise the float selects of csrc/core/dual_ops.cpp (no result changes)
    flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math", f'-DFWDCORE_VERSION={VERSION}',
             f'-DFWD_TORCH_VERSION="{torch.__version__}"']
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        # Portable: every x86-64 CPU since 2013 has AVX2+FMA. Never the build host's native ISA: such
        # binaries crash on older CPUs.
        flags += ["-mavx2", "-mfma", "-mf16c"]
    elif machine in ("aarch64", "arm64"):
        flags += ["-march=armv8-a"]  # NEON is part of armv8-a
    return flags


core_sources = sorted(glob.glob(os.path.join("csrc", "core", "*.cpp")))
ext_modules = [
    CppExtension(
        "fwdkernels._C",
        core_sources + ["csrc/torch/bindings.cpp"],
        include_dirs=[os.path.join(ROOT, "csrc", "core")],
        extra_compile_args={"cxx": cpu_flags()},
        extra_link_args=["-fopenmp"],
    )
]

cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
if torch.version.cuda and os.environ.get("FWDLLM_SKIP_CUDA_BUILD", "0") != "1" and cuda_sources:
    archs = os.environ.get("FWDLLM_CUDA_ARCHS", "80;90").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    ext_modules.append(
        CUDAExtension(
            "fwdkernels._C_cuda",
            # the core's sources too: the CUDA entry points report errors through its C API boundary
            # (api.cpp: guarded_call, fwd_last_error), as in the CMake build with FWDCORE_CUDA=ON
            core_sources + cuda_sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp"))),
            include_dirs=[os.path.join(ROOT, "csrc", "core"), os.path.join(ROOT, "csrc", "cuda")],
            extra_compile_args={"cxx": cpu_flags(),
                                "nvcc": ["-O3", "-std=c++17", f"-DFWDCORE_VERSION={VERSION}"] + gencode},
            extra_link_args=["-fopenmp"],
        )
    )

setup(
    name="fwdllm",
    version=VERSION,
    description="Forward-gradient (backprop-free) fine-tuning kernels and federated driver",
    packages=["fwdkernels", "fwdllm", "fwdllm.fl"],
    package_dir={"fwdkernels": "fwdkernels", "fwdllm": "python/fwdllm"},
    python_requires=">=3.9",
    install_requires=["torch>=2.3", "numpy", "transformers", "peft", "matplotlib"],
    entry_points={"console_scripts": ["fwdllm = fwdllm.cli:main"]},
    extras_require={
        "test": ["pytest", "pytest-benchmark", "peft", "transformers"],
        "triton": ["triton"],
        # fwdllm.flower: the Flower ServerApp/ClientApp (simulation extra = Ray); install with the torch
        # constraint (pip install -c constraints.txt -e .[flower]) so that nothing replaces torch.
        "flower": ["flwr[simulation]==1.41.0", "psutil"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
