"""Helpers shared by the kernel test files: which backends run here, skip marks, dtypes and the
per-dtype tolerances."""
import os

import pytest
import torch

import fwdkernels as fk


def backend_available(name: str) -> bool:
    return not fk.available_backends("cpu")[name]


HAS_CPP = backend_available("cpp")
HAS_TRITON = backend_available("triton")
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="cpp backend unavailable")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable")

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
# (relative-norm tolerance, max-abs tolerance as a fraction of max |ref|)
TOL = {F64: (1e-12, 1e-12), F32: (1e-5, 2e-5), BF16: (2e-2, 3e-2)}

BACKEND_DTYPES = [
    pytest.param("cpp", F32, id="cpp-f32", marks=needs_cpp),
    pytest.param("reference", F32, id="reference-f32"),
    pytest.param("reference", F64, id="reference-f64"),
]
