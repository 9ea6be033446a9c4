"""Module-level rules: modules whose whole forward has one fused dual, caught before their ops.

While the engine runs a model, the ``forward`` of these modules is replaced (an instance attribute,
restored afterwards; the class is untouched):

- peft LoRA ``Linear`` layers (over ``nn.Linear`` or GPT-2's ``Conv1D``): the base layer and the
  low-rank tail in one ``lora_linear_dual`` call, the perturbations of A and B regenerated inside the
  kernel. Layers the kernel cannot take (DoRA and other variants, several active adapters, a LoRA bias,
  mixed-batch adapter names, dropout in training) run peft's own forward through the op rules.
- elementwise activations (transformers' ``ACT2CLS`` classes and torch's activation modules): the
  tangent is f'(x) x_dot, with f'(x) = jvp(f, x, 1) of the module's own forward on the primal, so
  composite activations (GPT-2's ``gelu_new``, ``quick_gelu``, ...) cost one tangent pass.
- RMS norms: a module with a 1-d ``weight`` and an epsilon whose forward is found, on a probe input at
  patch time, to compute HF's RMSNorm (``weight * normalize(x)``, or Gemma's ``(1 + weight) * ...``):
  ``rms_norm_dual``. No class-name table: the probe decides.

And one function: the rotary embedding ``apply_rotary_pos_emb(q, k, cos, sin)`` of the modeling module
of an attention module, when a probe finds it computes the rotate-half rotary of LLaMA and most
decoders, is replaced (in that module's globals, for the session) by ``rotary_dual``: one pass per
tensor instead of the seven ops of its composite.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from fwdkernels import dual_ops as D

from .core import RULES, STATS, Dual, P, lazy_out, make_dual, prim_rows, rows_of, tan, tangent_K
from .rules import _cast, _coef_out, deferred, fused_linear


def _peft_lora_linear():
    try:
        from peft.tuners.lora import Linear
        return Linear
    except Exception:
        return None


def _conv1d():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:
        return None


def _lora_parts(mod):
    """(W, b, weight_t, A, B, scaling) of a peft LoRA Linear the fused kernel can take, else None."""
    if getattr(mod, "disable_adapters", False) or getattr(mod, "merged", False):
        return None
    active = [a for a in mod.active_adapters if a in mod.lora_A]
    if len(active) != 1:
        return None
    a = active[0]
    if a in getattr(mod, "lora_variant", {}) or getattr(mod, "use_dora", {}).get(a, False):
        return None
    A, B = mod.lora_A[a], mod.lora_B[a]
    if not (isinstance(A, torch.nn.Linear) and isinstance(B, torch.nn.Linear)) or A.bias is not None or \
            B.bias is not None:
        return None
    drop = mod.lora_dropout[a]
    if not isinstance(drop, torch.nn.Identity) and (drop.training and drop.p > 0):
        return None
    base = mod.base_layer
    conv = _conv1d()
    if isinstance(base, torch.nn.Linear):
        weight_t = False
    elif conv is not None and isinstance(base, conv):
        weight_t = True
    else:
        return None
    if getattr(mod, "fan_in_fan_out", False) != weight_t:
        return None
    return base.weight, base.bias, weight_t, A.weight, B.weight, float(mod.scaling[a])


def lora_forward(mod, orig):
    def forward(x, *args, **kwargs):
        if args or kwargs:
            return orig(x, *args, **kwargs)
        parts = _lora_parts(mod)
        if parts is None:
            return orig(x)
        W, b, wt, A, B, s = parts
        if not any(type(v) is Dual for v in (x, W, b, A, B)):
            return orig(x)
        out = fused_linear(x, W, b, A, B, s, weight_t=wt)
        return out
    return forward


def _act_classes():
    classes = {torch.nn.GELU, torch.nn.SiLU, torch.nn.Tanh, torch.nn.ReLU, torch.nn.Sigmoid, torch.nn.Mish,
               torch.nn.Hardswish, torch.nn.LeakyReLU, torch.nn.ReLU6, torch.nn.ELU, torch.nn.Softplus}
    try:
        from transformers.activations import ACT2CLS
        for v in ACT2CLS.values():
            classes.add(v[0] if isinstance(v, tuple) else v)
    except Exception:
        pass
    return tuple(classes)


ACT_CLASSES = None


def is_activation(mod) -> bool:
    global ACT_CLASSES
    if ACT_CLASSES is None:
        ACT_CLASSES = _act_classes()
    return isinstance(mod, ACT_CLASSES)


def activation_forward(mod, orig):
    def forward(x, *args, **kwargs):
        if type(x) is not Dual or args or kwargs or any(type(p) is Dual for p in mod.parameters(recurse=False)):
            return orig(x, *args, **kwargs)
        xp = x._plain
        with torch._C.DisableTorchFunctionSubclass():
            y, c = torch.func.jvp(orig, (xp,), (torch.ones_like(xp),))
        return _coef_out(x, y, c, "activation", force_lazy=True)
    return forward


class _Record(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


def single_op_with_rule(mod) -> bool:
    """True when the activation module's forward is one torch op that has an engine rule (F.gelu,
    F.silu, torch.tanh, ...): the op rule serves it, no module rule needed."""
    x = torch.linspace(-3, 3, 8)
    rec = _Record()
    try:
        with torch.no_grad(), rec:
            mod(x)
    except Exception:
        return False
    funcs = [f for f in rec.funcs if getattr(f, "__name__", "") not in ("__get__", "dim", "size")]
    return len(funcs) == 1 and funcs[0] in RULES


def _eps(mod):
    for n in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(mod, n, None)
        if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)):
            return float(v)
    return None


def rms_variant(mod) -> str | None:
    """"plain" (weight * h) or "offset" ((1 + weight) * h) when ``mod`` computes HF's RMSNorm over the
    last dim (checked on a probe input, in float32), else None."""
    w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
    eps = _eps(mod)
    if w is None or w.dim() != 1 or eps is None or len(mod._parameters) != 1 or len(list(mod.children())):
        return None
    d = w.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, d, generator=g).to(w.device)
    try:
        with torch.no_grad():
            wf = w.detach().float()
            saved = w.data
            w.data = wf
            try:
                y = mod(x)
            finally:
                w.data = saved
    except Exception:
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    for name, ref in (("plain", wf * h), ("offset", (1 + wf) * h)):
        if torch.allclose(y.float(), ref, rtol=1e-5, atol=1e-6):
            return name
    return None


def rms_forward(mod, orig, variant):
    eps = _eps(mod)

    def forward(x, *args, **kwargs):
        w = mod.weight
        if args or kwargs or (type(x) is not Dual and type(w) is not Dual):
            return orig(x, *args, **kwargs)
        xp = P(x)
        wp = P(w).to(xp.dtype)
        if variant == "offset":
            wp = 1 + wp
        wd = _cast(tan(w), xp.dtype)
        if type(w) is not Dual:
            y = orig(xp)  # the module's own primal, bit for bit
        else:
            y = D.rms_norm_dual(xp, None, wp, eps)[0]
        STATS.add("fused", "rms_norm")
        return deferred(y, x, lambda xs, t, inplace: D.rms_norm_dual(xs, t, wp, eps, weight_dot=wd, inplace=inplace)[1],
                        tangent_K(x if type(x) is Dual else w), range(y.dim() - 1))
    return forward


class ModuleRules:
    """Which modules of a model get a module-level rule, decided once per model (the RMS probe)."""

    def __init__(self, model: torch.nn.Module):
        lora = _peft_lora_linear()
        self.lora, self.acts, self.rms = [], [], []
        self.rotary = rotary_modules(model)
        for m in model.modules():
            if lora is not None and isinstance(m, lora):
                self.lora.append(m)
            elif is_activation(m):
                if not single_op_with_rule(m):
                    self.acts.append(m)
            else:
                v = rms_variant(m)
                if v is not None:
                    self.rms.append((m, v))

    def install(self):
        """Replace the forwards; returns the undo list [(module, had instance forward, old)]."""
        undo = []
        for m in self.lora:
            undo.append(_set_forward(m, lora_forward(m, m.forward)))
        for m in self.acts:
            undo.append(_set_forward(m, activation_forward(m, m.forward)))
        for m, v in self.rms:
            undo.append(_set_forward(m, rms_forward(m, m.forward, v)))
        for mod, fn in self.rotary:
            setattr(mod, "apply_rotary_pos_emb", rotary_function(fn))
            undo.append((mod, "function", fn))
        return undo


def _set_forward(m, fn):
    had = "forward" in m.__dict__
    old = m.__dict__.get("forward")
    m.forward = fn
    return m, had, old


def uninstall(undo):
    for m, had, old in reversed(undo):
        if had == "function":
            setattr(m, "apply_rotary_pos_emb", old)
        elif had:
            m.forward = old
        else:
            del m.forward


# ---------------------------------------------------------------------------------------------
# the rotary embedding function

def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def probe_rotary(fn) -> bool:
    """Whether fn(q, k, cos, sin) computes (q cos + rotate_half(q) sin, k ...) with cos / sin (B, L, D)
    unsqueezed at dim 1 (on a probe input)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 1, 3, 8, generator=g)
    cos, sin = torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    try:
        with torch.no_grad():
            qo, ko = fn(q, k, cos, sin)
    except Exception:
        return False
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return (isinstance(qo, torch.Tensor) and torch.allclose(qo, q * c + _rotate_half(q) * s, atol=1e-6)
            and torch.allclose(ko, k * c + _rotate_half(k) * s, atol=1e-6))


def _rotary_one(x, c, s):
    """x (B, H, L, D) Dual or plain, c / s broadcastable (unsqueezed): the embedded x."""
    xp = P(x)
    y = (xp * c) + (_rotate_half(xp) * s)  # the model's own primal ops
    if type(x) is not Dual:
        return y
    n = y.dim()

    def fn(dim, idx):
        return D.rotary_dual(prim_rows(xp, dim, idx, n), _cast(rows_of(x, dim, idx, n), xp.dtype),
                             prim_rows(c, dim, idx, n), prim_rows(s, dim, idx, n))[1]
    STATS.add("fused", "rotary")
    return lazy_out(y, tangent_K(x), fn, range(n - 1))


def rotary_function(orig):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if args or set(kwargs) - {"unsqueeze_dim"} or (type(q) is not Dual and type(k) is not Dual) or \
                type(cos) is Dual or type(sin) is Dual or P(cos).shape[-1] != P(q).shape[-1] or P(q).dim() != 4:
            return orig(q, k, cos, sin, *args, **kwargs)
        ud = kwargs.get("unsqueeze_dim", 1)
        c, s = P(cos).unsqueeze(ud), P(sin).unsqueeze(ud)
        if c.dtype != P(q).dtype:
            return orig(q, k, cos, sin, *args, **kwargs)
        return _rotary_one(q, c, s), _rotary_one(k, c, s)
    apply_rotary_pos_emb.fwdllm_orig = orig
    return apply_rotary_pos_emb


def rotary_modules(model) -> list:
    """The modeling modules (python modules of the model's classes) whose ``apply_rotary_pos_emb`` is the
    rotate-half rotary (probe)."""
    out = []
    for name in sorted({type(m).__module__ for m in model.modules()}):
        mod = sys.modules.get(name)
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        fn = getattr(fn, "fwdllm_orig", fn)
        if callable(fn) and probe_rotary(fn):
            out.append((mod, fn))
    return out
