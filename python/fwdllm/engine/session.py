"""A dual session: the scope in which code runs with tangents.

Inside ``with Session(...)``:
- autograd is off and the model (if any) is in eval mode (dropout off: a random mask would make the
  primal and the tangent streams inconsistent); both are restored on exit;
- the model's parameters named in ``bindings`` are replaced by Duals (in the owning modules'
  ``_parameters``, like ``torch.func.functional_call``), restored on exit;
- module-level rules (``modules.ModuleRules``) replace the forwards of LoRA layers, activations and
  RMS norms;
- transformers' attention lookups route to the fused dual attention (``attention.routed``);
- (once per process) glibc keeps freed tangent buffers warm (``memory.tune``).
Nothing of this is visible after the session: the model is as it was.
"""
from __future__ import annotations

import contextlib

import torch

from . import memory
from .attention import routed
from .modules import ModuleRules, uninstall


def parameter_slots(model: torch.nn.Module, params) -> list:
    """[(module, attribute name, parameter)] of every place in ``model`` that holds one of ``params``
    (a tied parameter appears once per owning module)."""
    ids = {id(p) for p in params}
    out = []
    for m in model.modules():
        for n, p in m._parameters.items():
            if p is not None and id(p) in ids:
                out.append((m, n, p))
    return out


class Session(contextlib.ExitStack):
    """See the module docstring.

    Args:
        model: the nn.Module whose forward will run, or None (plain functions).
        slots: ``parameter_slots(model, ...)`` for the bound parameters.
        bindings: {id(parameter): Dual} the values the parameters take inside the session.
        rules: the model's ModuleRules (module-level fused rules), or None.
        extra: more context managers to enter (e.g. the prefix-cache layer overrides).
    """

    def __init__(self, model=None, slots=(), bindings=None, rules: ModuleRules | None = None, extra=()):
        super().__init__()
        self.model, self.slots, self.bindings, self.rules, self.extra = model, slots, bindings or {}, rules, extra

    def __enter__(self):
        super().__enter__()
        memory.tune()
        try:
            self.enter_context(torch.no_grad())
            if self.model is not None:
                self.enter_context(_eval_mode(self.model))
            if self.bindings:
                self.enter_context(_bound(self.slots, self.bindings))
            if self.rules is not None:
                undo = self.rules.install()
                self.callback(uninstall, undo)
            self.enter_context(routed())
            self.enter_context(_functions_traced())
            for cm in self.extra:
                self.enter_context(cm)
        except BaseException:
            self.close()
            raise
        return self


@contextlib.contextmanager
def _functions_traced():
    """torch.autograd.Function.apply on Duals runs rules.function_apply (restored on exit)."""
    from .rules import function_apply
    prev = torch.autograd.Function.__dict__["apply"]
    torch.autograd.Function.apply = classmethod(function_apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = prev


@contextlib.contextmanager
def _eval_mode(model):
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


@contextlib.contextmanager
def _bound(slots, bindings):
    done = []
    try:
        for m, n, p in slots:
            v = bindings.get(id(p))
            if v is not None:
                m._parameters[n] = v
                done.append((m, n, p))
        yield
    finally:
        for m, n, p in done:
            m._parameters[n] = p
