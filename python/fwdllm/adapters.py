"""Bottleneck adapters (Houlsby et al., 2019), the third PEFT kind FwdLLM compares with LoRA and BitFit.

peft has no bottleneck adapter, so fwdllm brings a small one: :func:`add_adapters` wraps chosen
``nn.Linear`` layers (BERT: ``attention.output.dense`` and ``output.dense``; LLaMA: ``o_proj`` and
``down_proj``) so that their output h becomes h + up(act(down(h))), with down (r = d / reduction)
and up trainable, everything else frozen. ``up`` starts at zero (the model is unchanged at init)
unless ``init_scale`` is given. Dual mode supports the wrapped layers (fwdllm.dual.linear).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class BottleneckAdapter(torch.nn.Module):
    """base (a Linear) followed by h + up(gelu(down(h))). down: (r, d), up: (d, r)."""

    def __init__(self, base: torch.nn.Linear, reduction: int = 16, init_scale: float = 0.0):
        super().__init__()
        d = base.out_features
        r = max(1, d // reduction)
        self.base = base
        self.down = torch.nn.Linear(d, r)
        self.up = torch.nn.Linear(r, d)
        torch.nn.init.normal_(self.down.weight, std=d ** -0.5)
        torch.nn.init.zeros_(self.down.bias)
        torch.nn.init.normal_(self.up.weight, std=init_scale * r ** -0.5) if init_scale else torch.nn.init.zeros_(
            self.up.weight)
        torch.nn.init.zeros_(self.up.bias)
        self.to(base.weight.device, base.weight.dtype)

    def forward(self, x):
        h = self.base(x)
        return h + self.up(F.gelu(self.down(h)))


DEFAULT_TARGETS = ("attention.output.dense", "output.dense", "o_proj", "down_proj")


def add_adapters(model: torch.nn.Module, reduction: int = 16, targets=DEFAULT_TARGETS, init_scale: float = 0.0,
                 train_head: bool = True) -> torch.nn.Module:
    """Insert bottleneck adapters after the Linear layers whose qualified name ends with one of
    ``targets``, freeze every other parameter (except the classification head when ``train_head``),
    and return the model (modified in place). Raises if nothing matched."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = []
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(child, torch.nn.Linear) and any(full.endswith(t) for t in targets):
                setattr(mod, cname, BottleneckAdapter(child, reduction, init_scale))
                found.append(full)
    if not found:
        raise ValueError(f"add_adapters: no Linear layer matched {targets}")
    for mod in model.modules():
        if isinstance(mod, BottleneckAdapter):
            for p in list(mod.down.parameters()) + list(mod.up.parameters()):
                p.requires_grad_(True)
    if train_head:
        for hname in ("classifier", "score"):
            head = getattr(model, hname, None)
            if isinstance(head, torch.nn.Module):
                for p in head.parameters():
                    p.requires_grad_(True)
    return model
