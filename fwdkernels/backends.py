"""The backend registry.

Every op file registers one implementation per backend together with a ``reasons(**inputs)``
function listing why that backend cannot serve those inputs (empty list: it can). Dispatch walks the
device's preference order and takes the first backend with no reasons; when a backend is forced
(``backend=`` argument or the ``FWDKERNELS_BACKEND`` environment variable) and cannot serve, the call
fails with every reason instead of silently falling back. One exception: an op that has no
implementation at all for the backend forced by ``FWDKERNELS_BACKEND`` (e.g. ``layer_norm_dual`` under
``triton``) takes the automatic choice, so a whole model runs with the forced backend wherever it has a
kernel. Every call that did not get the backend it asked for (that one, and automatic choices that
skipped a preferred backend: e.g. float16 on the CPU) is counted in :func:`fallback_report`.

Backends:
  reference  pure PyTorch, any device; float64-capable; the ground truth for the others
  cpp        fwdkernels._C (csrc/core), CPU tensors, float32/bfloat16
  triton     Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  cuda       fwdkernels._C_cuda (csrc/cuda), CUDA tensors (when built)
"""
from __future__ import annotations

import collections
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import _ext

BACKENDS = ("reference", "cpp", "triton", "cuda")
PREFERENCE = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def kernel_dtype_reasons(dtype) -> list[str]:
    """Why the compiled (cpp / triton / cuda) kernels cannot take ``dtype`` ([] if they can)."""
    if dtype not in KERNEL_DTYPES:
        return [f"supports float32 and bfloat16, not {dtype}"]
    return []


def backend_unavailable(name: str, device: torch.device | str) -> list[str]:
    """Why backend ``name`` cannot run at all on ``device`` (independent of the op)."""
    dev = torch.device(device).type
    if name == "reference":
        return []
    if name == "cpp":
        out = []
        if _ext.C is None:
            out.append(f"cpp: the compiled extension is not loaded ({_ext.LOAD_ERROR})")
        if dev != "cpu":
            out.append(f"cpp: runs on CPU tensors only, got device {dev}")
        return out
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return ["triton: the triton package is not installed"]
        if dev == "cuda":
            return []
        if dev == "cpu" and _triton_interpret():
            return []
        return [f"triton: needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 (got {dev})"]
    if name == "cuda":
        out = []
        if _ext.C_CUDA is None:
            why = _ext.CUDA_LOAD_ERROR or "torch has no CUDA or the CUDA extension was not built"
            out.append(f"cuda: the CUDA extension is not loaded ({why})")
        if dev != "cuda":
            out.append(f"cuda: runs on CUDA tensors only, got device {dev}")
        return out
    return [f"unknown backend {name!r}; choose one of {BACKENDS}"]


_FALLBACKS = collections.Counter()  # (op, asked, got, reason) -> calls


def fallback_report() -> list[dict]:
    """The calls that ran on another backend than the one asked for (forced, or preferred on the
    device), since the last reset: [{op, asked, got, reason, calls}]."""
    return [{"op": o, "asked": a, "got": g, "reason": r, "calls": n} for (o, a, g, r), n in _FALLBACKS.items()]


def reset_fallback_report() -> None:
    _FALLBACKS.clear()


@dataclass
class _Impl:
    fn: Callable
    reasons: Callable[..., list]


@dataclass
class Op:
    name: str
    impls: dict = field(default_factory=dict)

    def register(self, backend: str, reasons: Callable[..., list] | None = None):
        def deco(fn):
            self.impls[backend] = _Impl(fn, reasons or (lambda **kw: []))
            return fn

        return deco

    def not_supported_reasons(self, backend: str, device, **inputs) -> list[str]:
        if backend not in self.impls:
            if backend not in BACKENDS:
                return [f"unknown backend {backend!r}; choose one of {BACKENDS}"]
            return [f"{backend}: {self.name} has no {backend} implementation"]
        out = backend_unavailable(backend, device)
        if not out:
            out = [f"{backend}: {r}" for r in self.impls[backend].reasons(**inputs)]
        return out

    def choose(self, device, backend: str | None = None, **inputs) -> str:
        """The backend that will run this call (see module docstring)."""
        env = os.environ.get("FWDKERNELS_BACKEND") or None
        forced = backend or env
        if forced:
            if not backend and forced in BACKENDS and forced not in self.impls:
                # the environment forces a backend this op has no kernel for: the automatic choice,
                # reported (an explicit backend= argument still fails loudly)
                got = self._auto(device, record=False, **inputs)
                _FALLBACKS[(self.name, forced, got, f"{self.name} has no {forced} implementation")] += 1
                return got
            why = self.not_supported_reasons(forced, device, **inputs)
            if why:
                src = "backend=" if backend else "FWDKERNELS_BACKEND="
                raise RuntimeError(
                    f"fwdkernels.{self.name}: {src}{forced!r} cannot serve this call:\n  " + "\n  ".join(why))
            return forced
        return self._auto(device, **inputs)

    def _auto(self, device, record=True, **inputs) -> str:
        """The first backend of the device's preference order that can serve the call."""
        dev = torch.device(device).type
        order = PREFERENCE.get(dev, ("reference",))
        all_reasons = []
        for b in order:
            why = self.not_supported_reasons(b, device, **inputs)
            if not why:
                if all_reasons and record:
                    _FALLBACKS[(self.name, order[0], b, "; ".join(all_reasons))] += 1
                return b
            all_reasons += why
        raise RuntimeError(f"fwdkernels.{self.name}: no backend can serve this call:\n  " + "\n  ".join(all_reasons))

    def explain(self, device, **inputs) -> dict:
        """{backend: [reasons it cannot serve]} for every backend ([] = it can)."""
        return {b: self.not_supported_reasons(b, device, **inputs) for b in BACKENDS}

    def impl(self, backend: str) -> Callable:
        return self.impls[backend].fn


def available_backends(device="cpu") -> dict:
    """{backend: [reasons it is unavailable on device]} ([] = available)."""
    return {b: backend_unavailable(b, device) for b in BACKENDS}
