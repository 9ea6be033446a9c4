"""Shared test setup for the fwdkernels suite.

* TRITON_INTERPRET=1 is set here, at import time, before anything imports triton or builds a kernel,
  so that the "triton" backend can run on CPU tensors (Triton's interpreter; slow, so tests that use it
  keep their shapes small). An explicit TRITON_INTERPRET in the environment wins (setdefault).
* FWDKERNELS_BACKEND is removed for every test (autouse fixture) so that tests relying on automatic
  dispatch are not silently redirected by the caller's environment; tests of the variable set it
  themselves with monkeypatch.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fwdkernels  # noqa: E402


def pytest_report_header(config):
    lines = []
    for name, why in fwdkernels.available_backends("cpu").items():
        lines.append(f"fwdkernels backend {name}: {'available' if not why else 'unavailable (' + '; '.join(why) + ')'}")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')} torch threads={torch.get_num_threads()}")
    return lines


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("FWDKERNELS_BACKEND", raising=False)
    yield
