"""The dual engine: runs any model's own forward (HF code untouched) while carrying K tangents.

- :mod:`.core`: the tangent-carrying tensor :class:`Dual`, the rule dispatch, the generic rule
  (vmap of torch.func.jvp of one op) and :data:`STATS` (how many ops ran fused / by rule / generic);
- :mod:`.rules`: the op rules (shape, elementwise, reductions, products, the fused kernels);
- :mod:`.attention`: SDPA and transformers' attention interface -> fwdkernels.attention_dual;
- :mod:`.modules`: module-level rules (peft LoRA layers, activations, RMS norms);
- :mod:`.session`: the scope of a dual run (parameters bound to Duals, rules installed, eval mode).
"""
from . import rules as _rules  # noqa: F401  (registers the op rules)
from .attention import register_interface
from .core import STATS, Dual, Seeded, Stats, UnsupportedModelError, is_dual, make_dual, P, tan
from .modules import ModuleRules
from .session import Session, parameter_slots

register_interface()

__all__ = ["Dual", "ModuleRules", "P", "STATS", "Seeded", "Session", "Stats", "UnsupportedModelError", "is_dual",
           "make_dual", "parameter_slots", "tan"]
