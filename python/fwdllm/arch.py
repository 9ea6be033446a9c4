"""Architecture facts, in one place, from the model itself (no class-name tables).

- the trunk: ``PreTrainedModel.base_model`` (the module named by ``base_model_prefix``); what the task
  model adds around it is the head (``head_modules``);
- the layer stack: the ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks inside the trunk
  (``layer_stack``), for the frozen-prefix cache and for selecting layers by index;
- LoRA targets: module-name suffixes, and the role names ``"query"`` / ``"value"`` resolved through
  peft's target-module mapping for ``config.model_type`` (``resolve_targets``).
"""
from __future__ import annotations

import re

import torch

__all__ = ["base_of", "head_modules", "head_parameter_names", "layer_stack", "resolve_targets", "trunk"]


def base_of(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trunk(model: torch.nn.Module) -> torch.nn.Module:
    """The task model's trunk (``base_model``, by ``base_model_prefix``), or the model itself."""
    base = base_of(model)
    t = getattr(base, "base_model", None)
    return t if isinstance(t, torch.nn.Module) else base


def layer_stack(model: torch.nn.Module):
    """(qualified name in ``model``, ModuleList) of the transformer blocks, or (None, None).

    The ModuleList of ``config.num_hidden_layers`` modules of one class inside the trunk: the blocks a
    forward runs in order. Models whose blocks share parameters (ALBERT's layer groups) have none."""
    base = base_of(model)
    cfg = getattr(base, "config", None)
    n = getattr(cfg, "num_hidden_layers", None)
    if not n:
        return None, None
    tr = trunk(model)
    names = {id(m): nm for nm, m in model.named_modules()}
    for _, m in tr.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n and len({type(b) for b in m}) == 1:
            return names.get(id(m)), m
    return None, None


def head_modules(model: torch.nn.Module) -> list:
    """The modules the task model adds around its trunk that hold parameters (classifier, score,
    pooler-less heads, lm_head): [(name in ``model``, module)]."""
    base, tr = base_of(model), trunk(model)
    if tr is base:
        return []
    names = {id(m): nm for nm, m in model.named_modules()}
    return [(names[id(m)], m) for n, m in base.named_children() if m is not tr and any(True for _ in m.parameters())]


def head_parameter_names(model: torch.nn.Module) -> set:
    """Names (as in ``model.named_parameters()``) of the parameters outside the trunk."""
    tr = trunk(model)
    inside = {id(p) for p in tr.parameters()}
    return {n for n, p in model.named_parameters() if id(p) not in inside}


def _linear_types():
    try:
        from transformers.pytorch_utils import Conv1D
        return (torch.nn.Linear, Conv1D)
    except Exception:
        return (torch.nn.Linear,)


def _peft_default_targets(model_type: str):
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as M
    except Exception:
        return None
    return M.get(model_type)


def resolve_targets(model: torch.nn.Module, targets, layers=None) -> list:
    """Qualified names of the modules LoRA should wrap.

    Each target is a module-name suffix (``"query"``, ``"q_proj"``, ``"attention.output.dense"``);
    a target matching no module may be a role, ``"query"`` or ``"value"``, which peft's target-module
    mapping for ``config.model_type`` names (its first / last default target). ``layers``: indices into
    the layer stack to restrict to (modules outside the stack, e.g. BERT's ``pooler.dense``, apply
    wherever they are). Raises ValueError naming the targets and candidates if nothing matches."""
    names = [n for n, _ in model.named_modules()]
    cfg = getattr(base_of(model), "config", None)
    mt = getattr(cfg, "model_type", None)
    default = _peft_default_targets(mt) or []
    roles = {"query": default[:1], "value": default[-1:]} if default else {}
    resolved = []
    for t in targets:
        hit = [n for n in names if n == t or n.endswith("." + t)]
        if not hit and t in roles:
            t2 = roles[t][0]
            hit = [n for n in names if n == t2 or n.endswith("." + t2)]
        resolved += hit
    stack_name, stack = layer_stack(model)
    if layers is not None and stack_name is not None:
        inside = re.compile(re.escape(stack_name) + r"\.(\d+)\.")
        keep = set(layers)
        resolved = [n for n in resolved if not inside.match(n + ".") or int(inside.match(n + ".").group(1)) in keep]
    resolved = list(dict.fromkeys(resolved))
    if not resolved:
        lin = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, _linear_types())})
        raise ValueError(f"targets {list(targets)} match no module of this {mt or type(model).__name__} model "
                         f"(its linear layers: {', '.join(lin[:12])}{' ...' if len(lin) > 12 else ''}; peft's "
                         f"default targets for {mt}: {default or 'none'})")
    return resolved
