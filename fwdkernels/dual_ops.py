"""Small dual (forward-mode) ops: the pieces of a transformer block besides the big linears and attention.

A dual value is a pair (x, x_dot): x the primal (..., d) and x_dot its K tangent streams (K, ..., d), or
None when no tangent reaches the value. A trainable parameter's tangent is an explicit tensor with a
leading K dim (e.g. weight_dot (K, d)); a frozen parameter has none. Every function returns (y, y_dot),
with y_dot (K, *y.shape) and None exactly when no tangent flows in (x_dot and every parameter tangent
None). All tangents of one call must agree on K.

These are plain PyTorch composites with closed-form derivatives (no autograd, no custom ops), vectorised
over K (no Python loop over K). Each allocates one tangent-sized (K, ..., d) tensor, its output, updated
in place (the norms on bfloat16 / float16 inputs work in a float32 copy of the tangent, then cast back),
plus primal-sized coefficients: derivatives of elementwise functions are computed once on the primal
(..., d) and broadcast over K, and row reductions over the tangent run as batched matrix products. On
CPU, allocating (first-touching) a large tensor costs more than an in-place pass over it, hence the
in-place updates. The losses allocate nothing tangent-sized (one matrix-vector product).

Precision: computed in the input dtype, except that reductions (norm statistics, softmax, losses) and the
derivative coefficients of elementwise functions are computed in float32 for bfloat16 / float16 inputs,
then cast back, so every output has its input's dtype (losses included). float64 inputs stay float64
(the references in the tests run in float64). All tensor arguments of a call must share one dtype
(integer ids / labels excepted; mse_loss_dual's target may be any floating dtype) and one device.

Dropout: dual mode runs with dropout off (model.eval() semantics); a random mask would make the forward
gradient's directional derivative inconsistent between the primal and tangent streams and is not
supported (torch.func.jvp does not support dropout either). There is no dropout_dual: skip dropout.

Functions:
  layer_norm_dual, rms_norm_dual                 norms over the last dim (rms: HF LlamaRMSNorm semantics)
  gelu_dual, silu_dual, tanh_dual                elementwise activations
  gated_mlp_act_dual                             silu(gate) * up (LLaMA MLP)
  rotary_dual                                    HF LLaMA rotary embedding (rotate_half convention)
  embedding_dual                                 token embedding lookup with an optional trainable table
  add_dual, linear_dual                          residual add; small dense layer (e.g. classifier head)
  cross_entropy_dual, causal_lm_loss_dual,
  mse_loss_dual                                  losses -> (loss (), loss_dot (K,))
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _ext
from .backends import Op, kernel_dtype_reasons

__all__ = [
    "add_dual",
    "causal_lm_loss_dual",
    "cross_entropy_dual",
    "embedding_dual",
    "gated_mlp_act_dual",
    "gelu_dual",
    "layer_norm_dual",
    "linear_dual",
    "mse_loss_dual",
    "rms_norm_dual",
    "rotary_dual",
    "silu_dual",
    "tanh_dual",
]

_LOW = (torch.bfloat16, torch.float16)
# elements (over all K) of a low-precision tangent upcast at once by the loss contractions
_CONTRACT_CHUNK = 1 << 22


# ---------------------------------------------------------------------------------------------
# validation helpers


def _ct(dtype):
    """Compute dtype for reductions / coefficients: float32 for bfloat16 / float16, else the dtype itself."""
    return torch.float32 if dtype in _LOW else dtype


def _fmt(shape):
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _check_primal(fn, name, t, min_dim=1):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be floating point, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{fn}: {name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def _check_like(fn, name, t, ref, ref_name="x", shape=None):
    """t (a parameter or tangent) must be a tensor with ref's dtype and device and, if given, the shape."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor or None, got {type(t).__name__}")
    if t.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                        "all inputs must share one dtype")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {_fmt(shape)}, got {tuple(t.shape)}")


def _num_tangents(fn, ref, ref_name, specs):
    """Validate tangents and return their common K, or None if all are None.

    specs: iterable of (name, tangent or None, primal shape); a tangent must have shape (K, *primal shape),
    ref's dtype and device, and the same K as every other tangent.
    """
    K, first = None, None
    for name, t, shape in specs:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor or None, got {type(t).__name__}")
        shape = tuple(shape)
        if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != shape:
            want = "(K" + "".join(f", {s}" for s in shape) + ")"
            raise ValueError(f"{fn}: {name} must have shape {want} (K tangents of a primal of shape "
                             f"{shape}), got {tuple(t.shape)}")
        if K is None:
            K, first = t.shape[0], name
            if K == 0:
                raise ValueError(f"{fn}: {name} has K = 0 tangents; pass None when no tangent flows")
        elif t.shape[0] != K:
            raise ValueError(f"{fn}: {name} has {t.shape[0]} tangents but {first} has K={K}")
        _check_like(fn, name, t, ref, ref_name)
    return K


# ---------------------------------------------------------------------------------------------
# backends: "reference" (the torch composites below, any dtype / device) and "cpp" (csrc/core/dual_ops.cpp
# through fwdkernels._C: one fused pass per op, float32 / bfloat16 CPU tensors). Only calls that carry
# tangents dispatch; a primal-only call is the plain torch op.


def _cpp_reasons_for(cfn):
    def reasons(dtype=None, four_d=True, **_):
        out = kernel_dtype_reasons(dtype)
        if _ext.C is not None and not hasattr(_ext.C, cfn):
            out.append(f"the loaded fwdkernels._C has no {cfn} (an older build: rebuild with "
                       "`pip install --no-build-isolation -e .`)")
        if not four_d:
            out.append("takes x of shape (B, H, L, D) only")
        return out
    return reasons


layer_norm_dual_op = Op("layer_norm_dual")
rms_norm_dual_op = Op("rms_norm_dual")
gelu_dual_op = Op("gelu_dual")
silu_dual_op = Op("silu_dual")
tanh_dual_op = Op("tanh_dual")
gated_mlp_act_dual_op = Op("gated_mlp_act_dual")
rotary_dual_op = Op("rotary_dual")
cross_entropy_dual_op = Op("cross_entropy_dual")
DUAL_OPS = (layer_norm_dual_op, rms_norm_dual_op, gelu_dual_op, silu_dual_op, tanh_dual_op, gated_mlp_act_dual_op,
            rotary_dual_op, cross_entropy_dual_op)


def _dispatch(op, t, backend, **inputs):
    return op.impl(op.choose(t.device, backend, dtype=t.dtype, **inputs))


def _lead(t, n):
    """View a parameter tangent (K, *p) as (K, 1 * n, *p) so it broadcasts against (K, *lead, *p)."""
    return t.view(t.shape[0], *([1] * n), *t.shape[1:])


def _rowdot(t, p):
    """sum over the last dim of t * p, keepdim: (K, ..., d) x (..., d) -> (K, ..., 1), without a (K, ..., d)
    temporary (einsum runs it as a batched matrix product over the rows)."""
    return torch.einsum("k...d,...d->k...", t, p).unsqueeze(-1)


def _contract(t_dot, G):
    """sum over all but the leading dim of t_dot * G: (K, *s) x (*s) -> (K,) in G's dtype.

    One matrix-vector product over the flattened tangent (a view when t_dot is contiguous). A
    low-precision tangent is upcast to G's dtype (float32) in column chunks of at most _CONTRACT_CHUNK
    elements, never whole.
    """
    K = t_dot.shape[0]
    t2 = t_dot.reshape(K, -1)
    g = G.reshape(-1)
    if t2.dtype == g.dtype:
        return torch.mv(t2, g)
    n = g.numel()
    step = max(1, _CONTRACT_CHUNK // K)
    acc = torch.zeros(K, dtype=g.dtype, device=g.device)
    for s in range(0, n, step):
        acc += torch.mv(t2[:, s:s + step].to(g.dtype), g[s:s + step])
    return acc


# ---------------------------------------------------------------------------------------------
# norms


def layer_norm_dual(x, x_dot, weight, bias, eps=1e-5, weight_dot=None, bias_dot=None, backend=None, inplace=False):
    """Dual of LayerNorm over the last dim (``F.layer_norm(x, (d,), weight, bias, eps)``).

        y  = x̂ γ + β,   x̂ = (x − μ) / σ,   σ = sqrt(var(x) + eps)   (biased variance)
        ẏ  = γ (ẋ − mean(ẋ) − x̂ mean(x̂ ẋ)) / σ + γ̇ x̂ + β̇            (means over the last dim)

    Args:
        x: (..., d) primal.  x_dot: (K, ..., d) or None.
        weight γ: (d,) or None (no affine scale).  bias β: (d,) or None.
        eps: variance epsilon.
        weight_dot γ̇: (K, d) or None (frozen / absent weight).  bias_dot β̇: (K, d) or None.
        backend: None (auto: cpp for float32 / bfloat16 CPU tensors, else reference) or a name.
        inplace: the cpp backend writes y_dot into x_dot (when contiguous; saves one (K, ..., d) buffer
            when x_dot is not needed again); other backends return a new tensor.

    Returns:
        (y (..., d), y_dot (K, ..., d) or None), in x's dtype. Without tangents y is F.layer_norm's output;
        the statistics are in float32 (reference) / double (cpp) for bfloat16 / float16 inputs.
    """
    fn = "layer_norm_dual"
    _check_primal(fn, "x", x)
    d = x.shape[-1]
    _check_like(fn, "weight", weight, x, shape=(d,))
    _check_like(fn, "bias", bias, x, shape=(d,))
    if weight_dot is not None and weight is None:
        raise ValueError(f"{fn}: weight_dot given but weight is None (no affine weight to train)")
    if bias_dot is not None and bias is None:
        raise ValueError(f"{fn}: bias_dot given but bias is None (no bias to train)")
    K = _num_tangents(fn, x, "x", (("x_dot", x_dot, x.shape), ("weight_dot", weight_dot, (d,)),
                                   ("bias_dot", bias_dot, (d,))))
    if K is None:
        return F.layer_norm(x, (d,), weight, bias, eps), None
    return _dispatch(layer_norm_dual_op, x, backend)(x, x_dot, weight, bias, eps, weight_dot, bias_dot, K,
                                                     inplace=inplace)


@layer_norm_dual_op.register("reference")
def _layer_norm_ref(x, x_dot, weight, bias, eps, weight_dot, bias_dot, K, inplace=False):
    d = x.shape[-1]
    y = F.layer_norm(x, (d,), weight, bias, eps)
    ct, nl = _ct(x.dtype), x.dim() - 1
    xc = x.to(ct)
    var, mu = torch.var_mean(xc, dim=-1, keepdim=True, correction=0)
    rstd = torch.rsqrt(var + eps)                                   # (..., 1)
    xhat = (xc - mu) * rstd                                         # (..., d)
    if x_dot is not None:
        # bfloat16 / float16: one float32 copy of the tangent, updated in place; else no copy until t
        xdc = x_dot.to(ct) if ct != x.dtype else x_dot
        m1 = xdc.mean(-1, keepdim=True)                             # (K, ..., 1)
        m2 = _rowdot(xdc, xhat).div_(d)                             # (K, ..., 1)
        t = xdc.sub_(m1) if xdc is not x_dot else xdc - m1          # (K, ..., d) in ct
        t.addcmul_(xhat, m2, value=-1)
        t.mul_(rstd if weight is None else weight.to(ct) * rstd)
        if weight_dot is not None:
            t.addcmul_(_lead(weight_dot, nl), xhat)
    elif weight_dot is not None:
        t = _lead(weight_dot, nl).to(ct) * xhat
    else:
        t = torch.zeros((K, *x.shape), dtype=ct, device=x.device)
    if bias_dot is not None:
        t.add_(_lead(bias_dot, nl))
    return y, t.to(x.dtype)


def rms_norm_dual(x, x_dot, weight, eps=1e-6, weight_dot=None, backend=None, inplace=False):
    """Dual of RMSNorm over the last dim, with HF ``LlamaRMSNorm`` semantics.

        h  = x / rms,   rms = sqrt(mean(x²) + eps),   y = γ h
        ḣ  = (ẋ − h mean(h ẋ)) / rms
        ẏ  = γ ḣ + γ̇ h
    (for d = 1, ḣ = eps ẋ / rms³ exactly, avoiding the cancellation of the general form)

    The primal is computed exactly as LlamaRMSNorm.forward: h in float32 (for bfloat16 / float16 /
    float32 inputs), cast back to x's dtype, then multiplied by the weight. float64 inputs stay in float64
    (LlamaRMSNorm would use float32).

    Args:
        x: (..., d) primal.  x_dot: (K, ..., d) or None.
        weight γ: (d,) or None (no scale).  eps: added to mean(x²).
        weight_dot γ̇: (K, d) or None (frozen / absent weight).
        backend: None (auto) or a backend name.

    Returns:
        (y (..., d), y_dot (K, ..., d) or None), in x's dtype.
    """
    fn = "rms_norm_dual"
    _check_primal(fn, "x", x)
    d = x.shape[-1]
    _check_like(fn, "weight", weight, x, shape=(d,))
    if weight_dot is not None and weight is None:
        raise ValueError(f"{fn}: weight_dot given but weight is None (no weight to train)")
    K = _num_tangents(fn, x, "x", (("x_dot", x_dot, x.shape), ("weight_dot", weight_dot, (d,))))
    if K is None:
        return _rms_norm_ref(x, None, weight, eps, None, None)
    return _dispatch(rms_norm_dual_op, x, backend)(x, x_dot, weight, eps, weight_dot, K, inplace=inplace)


@rms_norm_dual_op.register("reference")
def _rms_norm_ref(x, x_dot, weight, eps, weight_dot, K, inplace=False):
    d = x.shape[-1]
    ct, nl = _ct(x.dtype), x.dim() - 1
    xc = x.to(ct)
    rinv = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)      # (..., 1)
    h = xc * rinv                                                   # (..., d)
    hx = h.to(x.dtype)
    y = hx if weight is None else weight * hx
    if K is None:
        return y, None
    if x_dot is not None and d == 1:
        # ẋ − h mean(h ẋ) = ẋ eps / (x² + eps) exactly; the general form would cancel catastrophically
        t = x_dot * (eps * rinv * rinv * rinv)                      # (K, ..., 1) in ct
        if weight is not None:
            t.mul_(weight.to(ct))
        if weight_dot is not None:
            t.addcmul_(_lead(weight_dot, nl), h)
    elif x_dot is not None:
        xdc = x_dot.to(ct) if ct != x.dtype else x_dot
        m = _rowdot(xdc, h).div_(d)                                 # (K, ..., 1) = mean(h ẋ)
        t = xdc.mul_(rinv) if xdc is not x_dot else xdc * rinv      # (K, ..., d) in ct
        t.addcmul_(h, m.mul_(rinv), value=-1)
        if weight is not None:
            t.mul_(weight.to(ct))
        if weight_dot is not None:
            t.addcmul_(_lead(weight_dot, nl), h)
    else:
        t = _lead(weight_dot, nl).to(ct) * h
    return y, t.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# elementwise activations


def _elementwise(fn, x, x_dot):
    _check_primal(fn, "x", x)
    return _num_tangents(fn, x, "x", (("x_dot", x_dot, x.shape),))


def _gelu_grad(xc, approximate):
    if approximate == "none":  # Φ(x) + x φ(x), with two primal-sized temporaries
        out = torch.erf(xc * math.sqrt(0.5)).add_(1.0).mul_(0.5)
        pdf = (xc * xc).mul_(-0.5).exp_().mul_(xc).mul_(1.0 / math.sqrt(2.0 * math.pi))
        return out.add_(pdf)
    c, a = math.sqrt(2.0 / math.pi), 0.044715
    x2 = xc * xc
    th = torch.tanh(c * xc * (1.0 + a * x2))
    return 0.5 * (1.0 + th) + 0.5 * xc * (1.0 - th * th) * c * (1.0 + 3.0 * a * x2)


def gelu_dual(x, x_dot, approximate="none", inplace=False, backend=None):
    """Dual of ``F.gelu(x, approximate=...)``.

        exact ("none"):  y = x Φ(x),   ẏ = (Φ(x) + x φ(x)) ẋ          (Φ, φ: standard normal cdf, pdf)
        "tanh":          y = ½ x (1 + tanh u),  u = c (x + a x³),  c = sqrt(2/π), a = 0.044715
                         ẏ = [½ (1 + tanh u) + ½ x (1 − tanh² u) c (1 + 3 a x²)] ẋ

    Args:
        x: (..., d) primal.  x_dot: (K, ..., d) or None.  approximate: "none" or "tanh".
        inplace: write y_dot into x_dot (saves one (K, ..., d) buffer when x_dot is not needed again).
        backend: None (auto) or a backend name.

    Returns:
        (y (..., d), y_dot (K, ..., d) or None), in x's dtype; the coefficient is computed in float32 for
        bfloat16 / float16 inputs.
    """
    fn = "gelu_dual"
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{fn}: approximate must be 'none' or 'tanh', got {approximate!r}")
    K = _elementwise(fn, x, x_dot)
    if K is None:
        return F.gelu(x, approximate=approximate), None
    return _dispatch(gelu_dual_op, x, backend)(x, x_dot, approximate, inplace, K)


@gelu_dual_op.register("reference")
def _gelu_ref(x, x_dot, approximate, inplace, K):
    y = F.gelu(x, approximate=approximate)
    coef = _gelu_grad(x.to(_ct(x.dtype)), approximate).to(x.dtype)
    return y, (x_dot.mul_(coef) if inplace else x_dot * coef)


def _silu_grad(xc):
    s = torch.sigmoid(xc)
    return s * (1.0 + xc * (1.0 - s))


def silu_dual(x, x_dot, backend=None):
    """Dual of ``F.silu(x)`` = x σ(x):  ẏ = σ(x) (1 + x (1 − σ(x))) ẋ.

    Args:
        x: (..., d) primal.  x_dot: (K, ..., d) or None.

    Returns:
        (y (..., d), y_dot (K, ..., d) or None), in x's dtype.
    """
    K = _elementwise("silu_dual", x, x_dot)
    if K is None:
        return F.silu(x), None
    return _dispatch(silu_dual_op, x, backend)(x, x_dot, K)


@silu_dual_op.register("reference")
def _silu_ref(x, x_dot, K):
    y = F.silu(x)
    return y, x_dot * _silu_grad(x.to(_ct(x.dtype))).to(x.dtype)


def tanh_dual(x, x_dot, backend=None):
    """Dual of ``torch.tanh(x)`` (e.g. the BERT pooler):  ẏ = (1 − tanh²(x)) ẋ.

    Args:
        x: (..., d) primal.  x_dot: (K, ..., d) or None.

    Returns:
        (y (..., d), y_dot (K, ..., d) or None), in x's dtype.
    """
    K = _elementwise("tanh_dual", x, x_dot)
    if K is None:
        return torch.tanh(x), None
    return _dispatch(tanh_dual_op, x, backend)(x, x_dot, K)


@tanh_dual_op.register("reference")
def _tanh_ref(x, x_dot, K):
    y = torch.tanh(x)
    th = torch.tanh(x.to(_ct(x.dtype)))
    return y, x_dot * (1.0 - th * th).to(x.dtype)


def gated_mlp_act_dual(gate, gate_dot, up, up_dot, inplace=False, backend=None):
    """Dual of the LLaMA MLP activation ``silu(gate) * up`` (product rule).

        y = silu(g) u,   ẏ = silu'(g) u ġ + silu(g) u̇,   silu'(g) = σ(g) (1 + g (1 − σ(g)))

    Args:
        gate g: (..., f) primal.  gate_dot ġ: (K, ..., f) or None.
        up u: (..., f) primal (same shape as gate).  up_dot u̇: (K, ..., f) or None.
        inplace: write y_dot into gate_dot (when given; saves one (K, ..., f) buffer).
        backend: None (auto) or a backend name.

    Returns:
        (y (..., f), y_dot (K, ..., f) or None), in gate's dtype; y_dot is None only when both tangents are.
    """
    fn = "gated_mlp_act_dual"
    _check_primal(fn, "gate", gate)
    _check_like(fn, "up", up, gate, "gate", shape=gate.shape)
    K = _num_tangents(fn, gate, "gate", (("gate_dot", gate_dot, gate.shape), ("up_dot", up_dot, up.shape)))
    if K is None:
        return F.silu(gate) * up, None
    return _dispatch(gated_mlp_act_dual_op, gate, backend)(gate, gate_dot, up, up_dot, inplace, K)


@gated_mlp_act_dual_op.register("reference")
def _gated_ref(gate, gate_dot, up, up_dot, inplace, K):
    sg = F.silu(gate)
    y = sg * up
    t = None
    if gate_dot is not None:
        ct = _ct(gate.dtype)
        coef = (_silu_grad(gate.to(ct)) * up.to(ct)).to(gate.dtype)
        t = gate_dot.mul_(coef) if inplace else gate_dot * coef
    if up_dot is not None:
        t = up_dot * sg if t is None else t.addcmul_(up_dot, sg)
    return y, t


# ---------------------------------------------------------------------------------------------
# rotary, embedding


def rotary_dual(x, x_dot, cos, sin, unsqueeze_dim=1, backend=None):
    """Dual of the HF LLaMA rotary embedding ``x * cos + rotate_half(x) * sin``.

    rotate_half(x) = cat(−x₂, x₁) over the halves of the last dim. The map is linear in x, so
    ẏ = ẋ cos + rotate_half(ẋ) sin, written straight into the output halves (no rotate_half temporary):
        ẏ₁ = ẋ₁ cos₁ − ẋ₂ sin₁,   ẏ₂ = ẋ₂ cos₂ + ẋ₁ sin₂.

    Args:
        x: (B, H, L, D) primal (any (..., D) with D even).  x_dot: (K, *x.shape) or None.
        cos, sin: (B, L, D) as produced by HF's rotary embedding, unsqueezed at ``unsqueeze_dim`` as in
            ``apply_rotary_pos_emb`` (when cos has x.dim() − 1 >= 3 dims), or any shape that already
            broadcasts against x, e.g. (L, D) or (B, 1, L, D). Same dtype as x.
        unsqueeze_dim: where to insert the heads dim into (B, L, D) cos / sin (1 for (B, H, L, D) x,
            2 for (B, L, H, D)).
        backend: None (auto) or a backend name. The cpp kernel reads x / x_dot through their strides (a
            transposed (B, L, H, D) view needs no copy) and writes dense outputs.

    Returns:
        (y (*x.shape), y_dot (K, *x.shape) or None), in x's dtype.
    """
    fn = "rotary_dual"
    _check_primal(fn, "x", x)
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"{fn}: the last dim of x must be even, got {D}")
    _check_like(fn, "cos", cos, x)
    _check_like(fn, "sin", sin, x)
    if cos is None or sin is None:
        raise TypeError(f"{fn}: cos and sin are required")
    if cos.shape != sin.shape:
        raise ValueError(f"{fn}: cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dim() >= 3 and cos.dim() == x.dim() - 1:
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    try:
        ok = torch.broadcast_shapes(cos.shape, x.shape) == x.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{fn}: cos / sin of shape {tuple(cos.shape)} (after unsqueeze) do not broadcast to "
                         f"x's shape {tuple(x.shape)}")
    K = _num_tangents(fn, x, "x", (("x_dot", x_dot, x.shape),))
    if K is None:
        return _rotary_ref(x, None, cos, sin, None)
    return _dispatch(rotary_dual_op, x, backend, four_d=x.dim() == 4)(x, x_dot, cos, sin, K)


@rotary_dual_op.register("reference")
def _rotary_ref(x, x_dot, cos, sin, K):
    h = x.shape[-1] // 2
    y = x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin
    if K is None:
        return y, None
    out = torch.empty((K, *x.shape), dtype=x.dtype, device=x.device)
    x1, x2 = x_dot[..., :h], x_dot[..., h:]
    o1, o2 = out[..., :h], out[..., h:]
    torch.mul(x1, cos[..., :h], out=o1)
    o1.addcmul_(x2, sin[..., :h], value=-1)
    torch.mul(x2, cos[..., h:], out=o2)
    o2.addcmul_(x1, sin[..., h:])
    return y, out


def embedding_dual(input_ids, weight, weight_dot=None, padding_idx=None):
    """Dual of ``F.embedding(input_ids, weight, padding_idx)``: y = W[ids], ẏ = Ẇ[:, ids].

    The padding row is frozen, as in nn.Embedding (its gradient is always zero), so positions whose id is
    padding_idx get a zero tangent even if weight_dot's padding row is not zero. (torch.func.jvp of
    F.embedding would pass that row's tangent through.)

    Args:
        input_ids: (...) integer token ids.
        weight W: (V, d) embedding table.
        weight_dot Ẇ: (K, V, d) tangent of a trainable table, or None (frozen: no tangent flows).
        padding_idx: None or an index in [−V, V).

    Returns:
        (y (..., d), y_dot (K, ..., d) or None), in weight's dtype.
    """
    fn = "embedding_dual"
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool \
            or input_ids.is_complex():
        raise TypeError(f"{fn}: input_ids must be an integer tensor")
    _check_primal(fn, "weight", weight, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must have shape (V, d), got {tuple(weight.shape)}")
    if input_ids.device != weight.device:
        raise ValueError(f"{fn}: input_ids is on {input_ids.device} but weight is on {weight.device}")
    V, d = weight.shape
    if padding_idx is not None:
        if not -V <= padding_idx < V:
            raise ValueError(f"{fn}: padding_idx must be in [-{V}, {V}), got {padding_idx}")
        padding_idx = padding_idx + V if padding_idx < 0 else padding_idx
    K = _num_tangents(fn, weight, "weight", (("weight_dot", weight_dot, weight.shape),))
    y = F.embedding(input_ids, weight, padding_idx)
    if K is None:
        return y, None
    y_dot = weight_dot.index_select(1, input_ids.reshape(-1)).view(K, *input_ids.shape, d)
    if padding_idx is not None:
        y_dot.masked_fill_((input_ids == padding_idx).unsqueeze(-1), 0)
    return y, y_dot


# ---------------------------------------------------------------------------------------------
# residual add, small dense


def add_dual(a, a_dot, b, b_dot):
    """Dual of ``a + b`` (residual connections): ẏ = ȧ + ḃ, None-aware.

    Args:
        a: primal.  a_dot: (K, *a.shape) or None.
        b: primal broadcastable with a (same dtype).  b_dot: (K, *b.shape) or None.

    Returns:
        (y = a + b, y_dot (K, *y.shape) or None). When only one tangent is given and its primal already
        has y's shape, that tangent tensor itself is returned (no copy): treat it as shared, do not modify
        it in place.
    """
    fn = "add_dual"
    _check_primal(fn, "a", a, min_dim=0)
    _check_like(fn, "b", b, a, "a")
    if b is None:
        raise TypeError(f"{fn}: b is required")
    K = _num_tangents(fn, a, "a", (("a_dot", a_dot, a.shape), ("b_dot", b_dot, b.shape)))
    y = a + b
    if K is None:
        return y, None
    n = y.dim()

    def up(t, p):  # (K, *p.shape) -> broadcastable against (K, *y.shape)
        return _lead(t, n - p.dim()) if p.dim() < n else t

    if a_dot is not None and b_dot is not None:
        return y, up(a_dot, a) + up(b_dot, b)
    t, p = (a_dot, a) if a_dot is not None else (b_dot, b)
    if p.shape == y.shape:
        return y, t
    return y, up(t, p).expand(K, *y.shape).contiguous()


def linear_dual(x, x_dot, weight, bias=None, weight_dot=None, bias_dot=None):
    """Dual of ``F.linear(x, W, b)`` with an optionally trainable weight and bias (e.g. a classifier head).

        y = x Wᵀ + b,   ẏ_k = ẋ_k Wᵀ + x Ẇ_kᵀ + ḃ_k

    x Ẇᵀ for all K is one GEMM of the (M, d_in) rows against Ẇ viewed as (K d_out, d_in). For large frozen
    linears and LoRA use lora_linear_dual.

    Args:
        x: (..., d_in) primal.  x_dot: (K, ..., d_in) or None.
        weight W: (d_out, d_in).  bias b: (d_out,) or None.
        weight_dot Ẇ: (K, d_out, d_in) or None (frozen).  bias_dot ḃ: (K, d_out) or None (frozen / absent).

    Returns:
        (y (..., d_out), y_dot (K, ..., d_out) or None), in x's dtype.
    """
    fn = "linear_dual"
    _check_primal(fn, "x", x)
    _check_like(fn, "weight", weight, x)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"{fn}: weight must have shape (d_out, d_in), got "
                         f"{None if weight is None else tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"{fn}: x has {x.shape[-1]} features but weight expects d_in={d_in}")
    _check_like(fn, "bias", bias, x, shape=(d_out,))
    if bias_dot is not None and bias is None:
        raise ValueError(f"{fn}: bias_dot given but bias is None (no bias to train)")
    K = _num_tangents(fn, x, "x", (("x_dot", x_dot, x.shape), ("weight_dot", weight_dot, weight.shape),
                                   ("bias_dot", bias_dot, (d_out,))))
    y = F.linear(x, weight, bias)
    if K is None:
        return y, None
    lead = tuple(x.shape[:-1])
    t = None
    if x_dot is not None:
        t = F.linear(x_dot, weight)                                              # (K, ..., d_out)
    if weight_dot is not None:
        M = math.prod(lead)
        xw = (x.reshape(M, d_in) @ weight_dot.reshape(K * d_out, d_in).T)        # (M, K d_out)
        xw = xw.view(M, K, d_out).transpose(0, 1)                                # (K, M, d_out) view
        if t is None:
            t = xw.contiguous().view(K, *lead, d_out)
        else:
            t.view(K, M, d_out).add_(xw)
    if bias_dot is not None:
        b = _lead(bias_dot, len(lead))
        t = b.expand(K, *lead, d_out).clone() if t is None else t.add_(b)
    return y, t


# ---------------------------------------------------------------------------------------------
# losses


def cross_entropy_dual(logits, logits_dot, labels, ignore_index=-100, backend=None):
    """Dual of ``F.cross_entropy(logits, labels, ignore_index=ignore_index)`` (mean reduction).

    With p = softmax(l) over classes and n the number of non-ignored rows:
        loss   = (1/n) Σ_rows [logsumexp(l) − l[label]]
        loss_k = (1/n) Σ_rows Σ_c (p_c − 1[c = label]) l̇_k,c
    The tangent is one matrix-vector product of the flattened tangent (K, N C) with the primal-sized
    weights G = (p − onehot) / n (zero rows for ignored labels): no tangent-sized temporary.

    If every label is ignored, returns loss 0 and loss_dot zeros (F.cross_entropy would return nan).

    Args:
        logits: (..., C) primal, classes in the last dim (rows = all leading dims).
        logits_dot: (K, ..., C) or None.
        labels: (...) int64 class indices in [0, C), or ignore_index.
        ignore_index: label value whose rows are left out of the mean.
        backend: None (auto: cpp for float32 / bfloat16 CPU tensors with tangents) or a backend name.

    Returns:
        (loss (), loss_dot (K,) or None), in logits' dtype (computed in float32 for bfloat16 / float16).
    """
    fn = "cross_entropy_dual"
    _check_primal(fn, "logits", logits)
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool \
            or labels.is_complex():
        raise TypeError(f"{fn}: labels must be an integer (int64) tensor")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{fn}: labels must have shape {tuple(logits.shape[:-1])} (logits' leading dims), "
                         f"got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"{fn}: labels is on {labels.device} but logits is on {logits.device}")
    K = _num_tangents(fn, logits, "logits", (("logits_dot", logits_dot, logits.shape),))
    C = logits.shape[-1]
    lab = labels.reshape(-1)
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= C))
    if bool(bad.any()):
        raise ValueError(f"{fn}: labels must be in [0, {C}) or ignore_index={ignore_index}; got "
                         f"{lab[bad][0].item()}")
    if K is None:
        return _cross_entropy_ref(logits, None, labels, ignore_index, None)
    return _dispatch(cross_entropy_dual_op, logits, backend)(logits, logits_dot, labels, ignore_index, K)


@cross_entropy_dual_op.register("reference")
def _cross_entropy_ref(logits, logits_dot, labels, ignore_index, K):
    C = logits.shape[-1]
    ct = _ct(logits.dtype)
    lg = logits.reshape(-1, C).to(ct)                               # (N, C)
    lab = labels.reshape(-1)
    valid = lab != ignore_index
    n = int(valid.sum().item())
    if n == 0:
        loss = torch.zeros((), dtype=logits.dtype, device=logits.device)
        return loss, (None if K is None else torch.zeros(K, dtype=logits.dtype, device=logits.device))
    safe = torch.where(valid, lab, 0).unsqueeze(1)                  # (N, 1)
    lse = torch.logsumexp(lg, dim=-1, keepdim=True)                 # (N, 1)
    w = valid.to(ct).unsqueeze(1) / n                               # (N, 1)
    loss = ((lse - lg.gather(1, safe)) * w).sum()
    if K is None:
        return loss.to(logits.dtype), None
    G = torch.exp(lg - lse)                                         # softmax (N, C)
    G.scatter_add_(1, safe, torch.full_like(lse, -1.0))
    G.mul_(w)
    return loss.to(logits.dtype), _contract(logits_dot, G).to(logits.dtype)


def causal_lm_loss_dual(logits, logits_dot, labels, ignore_index=-100):
    """Dual of the HF causal-LM loss: position t predicts labels[:, t + 1].

    Same as HF's ``ForCausalLMLoss`` (mean over non-ignored targets): logits[:, :-1] are scored against
    labels[:, 1:]. Implemented by shifting the labels left (padding the last position with ignore_index)
    instead of slicing the logits, so the logits tangent is never copied. See cross_entropy_dual for the
    formulas and the all-ignored case (loss 0, loss_dot zeros).

    Args:
        logits: (B, L, V) primal.  logits_dot: (K, B, L, V) or None.
        labels: (B, L) int64 token ids (unshifted, e.g. the input ids) or ignore_index.

    Returns:
        (loss (), loss_dot (K,) or None), in logits' dtype.
    """
    fn = "causal_lm_loss_dual"
    _check_primal(fn, "logits", logits, min_dim=2)
    if not isinstance(labels, torch.Tensor) or labels.dim() < 1:
        raise TypeError(f"{fn}: labels must be an integer tensor of shape (B, L)")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{fn}: labels must have shape {tuple(logits.shape[:-1])} (logits' leading dims), "
                         f"got {tuple(labels.shape)}")
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return cross_entropy_dual(logits, logits_dot, shifted, ignore_index)


def mse_loss_dual(pred, pred_dot, target):
    """Dual of ``F.mse_loss(pred, target)`` (mean over all elements) for regression heads.

        loss = mean((pred − target)²),   loss_k = (2/n) Σ (pred − target) ṗ_k     (n = pred.numel())

    Args:
        pred: (...) primal.  pred_dot: (K, ...) or None.
        target: (...) same shape as pred, any floating dtype (a constant: no tangent).

    Returns:
        (loss (), loss_dot (K,) or None), in pred's dtype (computed in float32 for bfloat16 / float16).
    """
    fn = "mse_loss_dual"
    _check_primal(fn, "pred", pred, min_dim=0)
    _check_primal(fn, "target", target, min_dim=0)
    if tuple(target.shape) != tuple(pred.shape):
        raise ValueError(f"{fn}: target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    if target.device != pred.device:
        raise ValueError(f"{fn}: target is on {target.device} but pred is on {pred.device}")
    if pred.numel() == 0:
        raise ValueError(f"{fn}: pred is empty")
    K = _num_tangents(fn, pred, "pred", (("pred_dot", pred_dot, pred.shape),))
    ct = _ct(pred.dtype)
    diff = pred.to(ct) - target.to(ct)
    loss = (diff * diff).mean()
    if K is None:
        return loss.to(pred.dtype), None
    return loss.to(pred.dtype), _contract(pred_dot, diff * (2.0 / pred.numel())).to(pred.dtype)


# ---------------------------------------------------------------------------------------------
# cpp backend: torch.ops.fwdkernels.* custom ops (fake kernels for torch.compile / opcheck) around
# fwdkernels._C. The in-place variants (gelu_dual / gated_mlp_act_dual with inplace=True) call _C directly in
# eager mode, writing into the caller's tangent; under torch.compile they take the functional op.
# The primal output is the plain torch op's (bit-identical to the module the dual op replaces, as the
# reference backend's); the kernel's own primal, equal to it within rounding, is dropped. It costs one
# primal-sized pass, small beside the K tangent streams.

_T = torch.Tensor
_ACT = {"none": 0, "tanh": 1, "silu": 2, "tanh_fn": 3}  # fwd_activation codes (gelu erf, gelu tanh, ...)


@torch.library.custom_op("fwdkernels::norm_dual", mutates_args=())
def _norm_dual_custom(x: _T, x_dot: _T | None, weight: _T | None, bias: _T | None, weight_dot: _T | None,
                      bias_dot: _T | None, eps: float, K: int, rms: bool) -> tuple[_T, _T]:
    return _ext.C.norm_dual(x, x_dot, weight, bias, weight_dot, bias_dot, eps, K, rms, False)


@_norm_dual_custom.register_fake
def _(x, x_dot, weight, bias, weight_dot, bias_dot, eps, K, rms):
    return x.new_empty(x.shape), x.new_empty((K, *x.shape))


@torch.library.custom_op("fwdkernels::activation_dual", mutates_args=())
def _activation_dual_custom(x: _T, x_dot: _T | None, act: int, K: int) -> tuple[_T, _T]:
    return _ext.C.activation_dual(x, x_dot, act, K, False)


@_activation_dual_custom.register_fake
def _(x, x_dot, act, K):
    return x.new_empty(x.shape), x.new_empty((K, *x.shape))


@torch.library.custom_op("fwdkernels::gated_act_dual", mutates_args=())
def _gated_act_dual_custom(gate: _T, gate_dot: _T | None, up: _T, up_dot: _T | None, K: int) -> tuple[_T, _T]:
    return _ext.C.gated_act_dual(gate, gate_dot, up, up_dot, K, False)


@_gated_act_dual_custom.register_fake
def _(gate, gate_dot, up, up_dot, K):
    return gate.new_empty(gate.shape), gate.new_empty((K, *gate.shape))


@torch.library.custom_op("fwdkernels::rotary_dual", mutates_args=())
def _rotary_dual_custom(x: _T, x_dot: _T | None, cos: _T, sin: _T, K: int) -> tuple[_T, _T]:
    return _ext.C.rotary_dual(x, x_dot, cos, sin, K)


@_rotary_dual_custom.register_fake
def _(x, x_dot, cos, sin, K):
    return x.new_empty(x.shape), x.new_empty((K, *x.shape))


@torch.library.custom_op("fwdkernels::cross_entropy_dual", mutates_args=())
def _cross_entropy_dual_custom(logits: _T, logits_dot: _T | None, labels: _T, ignore_index: int,
                               K: int) -> tuple[_T, _T]:
    return _ext.C.cross_entropy_dual(logits, logits_dot, labels, ignore_index, K)


@_cross_entropy_dual_custom.register_fake
def _(logits, logits_dot, labels, ignore_index, K):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty((K,), dtype=torch.float32)


def _eager_inplace(inplace, t):
    return inplace and t is not None and t.is_contiguous() and not torch.compiler.is_compiling()


@layer_norm_dual_op.register("cpp", _cpp_reasons_for("norm_dual"))
def _layer_norm_cpp(x, x_dot, weight, bias, eps, weight_dot, bias_dot, K, inplace=False):
    d = x.shape[-1]
    if _eager_inplace(inplace, x_dot):
        yd = _ext.C.norm_dual(x.reshape(-1, d), x_dot.view(K, -1, d), weight, bias, weight_dot, bias_dot, float(eps),
                              K, False, True)[1]
        return F.layer_norm(x, (d,), weight, bias, eps), yd.view(K, *x.shape)
    _, yd = _norm_dual_custom(x.reshape(-1, d), None if x_dot is None else x_dot.reshape(K, -1, d), weight, bias,
                              weight_dot, bias_dot, float(eps), K, False)
    return F.layer_norm(x, (d,), weight, bias, eps), yd.view(K, *x.shape)


@rms_norm_dual_op.register("cpp", _cpp_reasons_for("norm_dual"))
def _rms_norm_cpp(x, x_dot, weight, eps, weight_dot, K, inplace=False):
    d = x.shape[-1]
    if _eager_inplace(inplace, x_dot):
        yd = _ext.C.norm_dual(x.reshape(-1, d), x_dot.view(K, -1, d), weight, None, weight_dot, None, float(eps), K,
                              True, True)[1]
        return _rms_norm_ref(x, None, weight, eps, None, None)[0], yd.view(K, *x.shape)
    _, yd = _norm_dual_custom(x.reshape(-1, d), None if x_dot is None else x_dot.reshape(K, -1, d), weight, None,
                              weight_dot, None, float(eps), K, True)
    return _rms_norm_ref(x, None, weight, eps, None, None)[0], yd.view(K, *x.shape)


def _activation_cpp(x, x_dot, act, inplace, K):
    if _eager_inplace(inplace, x_dot):
        return _ext.C.activation_dual(x, x_dot, act, K, True)[1]
    return _activation_dual_custom(x, x_dot, act, K)[1]


@gelu_dual_op.register("cpp", _cpp_reasons_for("activation_dual"))
def _gelu_cpp(x, x_dot, approximate, inplace, K):
    return F.gelu(x, approximate=approximate), _activation_cpp(x, x_dot, _ACT[approximate], inplace, K)


@silu_dual_op.register("cpp", _cpp_reasons_for("activation_dual"))
def _silu_cpp(x, x_dot, K):
    return F.silu(x), _activation_cpp(x, x_dot, _ACT["silu"], False, K)


@tanh_dual_op.register("cpp", _cpp_reasons_for("activation_dual"))
def _tanh_cpp(x, x_dot, K):
    return torch.tanh(x), _activation_cpp(x, x_dot, _ACT["tanh_fn"], False, K)


@gated_mlp_act_dual_op.register("cpp", _cpp_reasons_for("gated_act_dual"))
def _gated_cpp(gate, gate_dot, up, up_dot, inplace, K):
    if _eager_inplace(inplace, gate_dot):
        yd = _ext.C.gated_act_dual(gate, gate_dot, up, up_dot, K, True)[1]
    else:
        yd = _gated_act_dual_custom(gate, gate_dot, up, up_dot, K)[1]
    return F.silu(gate) * up, yd


@rotary_dual_op.register("cpp", _cpp_reasons_for("rotary_dual"))
def _rotary_cpp(x, x_dot, cos, sin, K):
    return _rotary_ref(x, None, cos, sin, None)[0], _rotary_dual_custom(x, x_dot, cos, sin, K)[1]


@cross_entropy_dual_op.register("cpp", _cpp_reasons_for("cross_entropy_dual"))
def _cross_entropy_cpp(logits, logits_dot, labels, ignore_index, K):
    C = logits.shape[-1]
    lab = labels.reshape(-1)
    if lab.dtype != torch.int64:
        lab = lab.to(torch.int64)
    _, loss_dot = _cross_entropy_dual_custom(logits.reshape(-1, C), logits_dot.reshape(K, -1, C), lab,
                                             int(ignore_index), K)
    # the loss as a primal-only call computes it (a call with and without tangents agree exactly)
    return _cross_entropy_ref(logits, None, labels, ignore_index, None)[0], loss_dot.to(logits.dtype)
