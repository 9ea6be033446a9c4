"""``fwdllm.func.jvp``: a drop-in for ``torch.func.jvp``.

Fused when ``func`` is a patched model's functional loss (:func:`functional_loss`): the directional
derivative comes from one dual forward (fwdkernels), with the tangents given explicitly. Any other
callable falls back to ``torch.func.jvp`` itself, so the function can replace it everywhere.
"""
from __future__ import annotations

import contextlib

import torch

from .dual import DualModel, explicit_run, patch


class FunctionalLoss:
    """f(*trainable_params) -> loss of a DualModel on one batch; params in the layout's order."""

    def __init__(self, dm: DualModel, batch):
        self.dm = dm
        self.batch = batch

    @property
    def params(self):
        return tuple(p for _, p in self.dm.layout.params)

    @contextlib.contextmanager
    def _bound(self, values):
        params = self.params
        if len(values) != len(params):
            raise ValueError(f"fwdllm.func: {len(values)} primals for {len(params)} trainable parameters")
        saved = []
        with torch.no_grad():
            for p, v in zip(params, values):
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"fwdllm.func: primal of shape {tuple(v.shape)} for a parameter of shape "
                                     f"{tuple(p.shape)}")
                if v is not p:
                    saved.append((p, p.detach().clone()))
                    p.copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, old in saved:
                    p.copy_(old)

    def __call__(self, *values):
        with self._bound(values):
            return self.dm.loss(self.batch)

    def jvp(self, values, tangents):
        with self._bound(values):
            tang = {}
            for p, t in zip(self.params, tangents):
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"fwdllm.func: tangent of shape {tuple(t.shape)} for a parameter of shape "
                                     f"{tuple(p.shape)}")
                tang[id(p)] = t.to(p.dtype).unsqueeze(0)
            loss, ld = explicit_run(self.dm, self.batch, tang, 1)
            return loss, ld[0].to(loss.dtype)


def functional_loss(model, batch) -> FunctionalLoss:
    """The loss of ``model`` (a DualModel, or a model to patch) on ``batch`` as a function of its
    trainable parameters, in ``DualModel.layout.params`` order."""
    dm = model if isinstance(model, DualModel) else patch(model)
    return FunctionalLoss(dm, batch)


def jvp(func, primals, tangents, *, strict=False, has_aux=False):
    """Same signature and results as ``torch.func.jvp``: returns (func(*primals), J(primals)·tangents)."""
    if isinstance(func, FunctionalLoss) and not has_aux:
        if not isinstance(primals, (tuple, list)) or not isinstance(tangents, (tuple, list)):
            raise TypeError("jvp: primals and tangents must be tuples of tensors")
        if len(primals) != len(tangents):
            raise ValueError("jvp: primals and tangents must have the same length")
        return func.jvp(tuple(primals), tuple(tangents))
    return torch.func.jvp(func, primals, tangents, strict=strict, has_aux=has_aux)
