"""Loading of the compiled extensions. A failed load warns once and leaves the reference (and Triton)
backends in charge; it never breaks ``import fwdkernels``.

``FWDKERNELS_DISABLE_EXT=1`` skips loading (useful to test the fallback).
"""
from __future__ import annotations

import os
import warnings

import torch

C = None  # fwdkernels._C, or None
C_CUDA = None  # fwdkernels._C_cuda, or None
LOAD_ERROR: str | None = None
CUDA_LOAD_ERROR: str | None = None


def _load():
    global C, C_CUDA, LOAD_ERROR, CUDA_LOAD_ERROR
    if os.environ.get("FWDKERNELS_DISABLE_EXT", "0") == "1":
        LOAD_ERROR = "disabled by FWDKERNELS_DISABLE_EXT=1"
        return
    try:
        from . import _C as mod  # noqa: WPS433

        built = getattr(mod, "torch_version", "unknown")
        if built not in ("unknown", torch.__version__):
            LOAD_ERROR = (f"fwdkernels._C was built against torch {built} but torch {torch.__version__} is "
                          "installed; rebuild with `pip install --no-build-isolation -e .`")
        else:
            C = mod
    except Exception as e:  # ImportError, undefined symbols, missing OpenMP runtime ...
        LOAD_ERROR = f"{type(e).__name__}: {e}"
    if LOAD_ERROR is not None:
        warnings.warn(
            f"fwdkernels: the compiled CPU extension could not be loaded ({LOAD_ERROR}); "
            "falling back to the reference backend.",
            RuntimeWarning,
            stacklevel=3,
        )
    if torch.version.cuda:
        try:
            from . import _C_cuda as cmod  # noqa: WPS433

            C_CUDA = cmod
        except Exception as e:
            CUDA_LOAD_ERROR = f"{type(e).__name__}: {e}"


_load()
