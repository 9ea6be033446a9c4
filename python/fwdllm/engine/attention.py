"""Attention in the dual engine: the fused one-pass dual attention (fwdkernels.attention_dual) behind

- ``F.scaled_dot_product_attention`` called on Duals (by user code or by transformers' ``sdpa``
  implementation), and
- transformers' attention interface: while the engine runs a model, every lookup of
  ``ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_fn)`` (the route of BERT, RoBERTa, DistilBERT,
  ALBERT, ELECTRA, GPT-2, OPT, LLaMA, Qwen2/3, Mistral, Phi-3, Gemma and most other architectures)
  returns :func:`dual_interface` over the model's own function, so eager-configured models get the
  fused kernel too. It takes the mask the model built for ``impl`` (additive float for eager, boolean or
  None for sdpa), and mirrors sdpa's causal rule. Plain inputs (the frozen prefix) and features the
  kernel lacks (softcap, attention sinks, position bias, returned attention weights) go to the model's
  own function, whose ops the engine differentiates op by op.

The name ``"fwdllm_dual"`` is also registered in transformers' ``AttentionInterface``
(``AttentionMaskInterface``: sdpa's boolean masks), so a model configured with
``attn_implementation="fwdllm_dual"`` uses it outside the engine too (plain inputs: SDPA).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import fwdkernels as fk

from .core import LAZY, STATS, Dual, Lazy, P, UnsupportedModelError, make_dual, register, rows_of, tan, tangent_K

NAME = "fwdllm_dual"


def _bad_kwargs(kwargs) -> str | None:
    for k in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(k) is not None:
            return k
    if kwargs.get("output_attentions"):
        return "output_attentions"
    return None


def _dual_attention(q, k, v, mask, causal, scale):
    """(B, H, L, D) output Dual of the fused kernel; q, k, v Duals or plain."""
    qp = P(q)
    dt = qp.dtype
    kp, vp = P(k).to(dt), P(v).to(dt)
    ts = [None if tan(t) is None else tan(t).to(dt) for t in (q, k, v)]
    o, od = fk.attention_dual(qp, kp, vp, *ts, attn_mask=mask, causal=causal, scale=scale)
    STATS.add("fused", "attention")
    return o, od


def _top_left_causal(L, S, device):
    return torch.ones(L, S, dtype=torch.bool, device=device).tril()


@register(F.scaled_dot_product_attention)
def sdpa(func, args, kwargs):
    """Dual of F.scaled_dot_product_attention (dropout_p must be 0: no random mask in dual mode)."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    a = dict(zip(names, args))
    a.update(kwargs)
    q, k, v = a["query"], a["key"], a["value"]
    mask, p = a.get("attn_mask"), a.get("dropout_p", 0.0)
    causal, scale, gqa = a.get("is_causal", False), a.get("scale"), a.get("enable_gqa", False)
    if p:
        raise UnsupportedModelError(f"fwdllm: scaled_dot_product_attention with dropout_p={p} in a dual forward "
                                    "(a random mask makes the primal and the tangents inconsistent)")
    qp, kp, vp = P(q), P(k), P(v)
    if type(mask) is Dual or qp.dim() < 2 or kp.shape[:-2] != vp.shape[:-2]:
        return _sdpa_math(q, k, v, mask, causal, scale, gqa)
    lead = qp.shape[:-2]
    if qp.dim() != 4 or kp.dim() != 4:
        if tuple(kp.shape[:-2]) != tuple(lead):
            return _sdpa_math(q, k, v, mask, causal, scale, gqa)
        return _sdpa_reshaped(q, k, v, mask, causal, scale)
    H, Hkv = qp.shape[1], kp.shape[1]
    if H != Hkv and not gqa:
        return _sdpa_math(q, k, v, mask, causal, scale, gqa)  # torch raises the shape error
    L, S = qp.shape[-2], kp.shape[-2]
    if causal:
        if mask is not None:
            return _sdpa_math(q, k, v, mask, causal, scale, gqa)
        if L != S:  # torch's is_causal is top-left aligned; the kernel's bottom-right
            mask, causal = _top_left_causal(L, S, qp.device), False
    o, od = _dual_attention(q, k, v, mask, bool(causal), scale)
    return make_dual(o, od) if od is not None else o


def _sdpa_reshaped(q, k, v, mask, causal, scale):
    """SDPA on (..., L, D) inputs of any rank: as (1, N, L, D) for the kernel."""
    lead = P(q).shape[:-2]

    def four(t):
        return t.reshape(1, -1, *t.shape[-2:])

    m = None
    if mask is not None:
        mp = P(mask)
        m = mp.expand(*lead, mp.shape[-2], mp.shape[-1]).reshape(1, -1, mp.shape[-2], mp.shape[-1])
    o = sdpa(F.scaled_dot_product_attention, (four(q), four(k), four(v)),
             {"attn_mask": m, "is_causal": causal, "scale": scale})
    return o.reshape(*lead, *o.shape[-2:])


def _sdpa_math(q, k, v, mask, causal, scale, gqa):
    """SDPA as its math composite (matmul, softmax): the engine's op rules give the tangents."""
    L, S, Dh = P(q).shape[-2], P(k).shape[-2], P(q).shape[-1]
    s = (1.0 / Dh ** 0.5) if scale is None else scale
    if gqa and P(q).dim() >= 3 and P(q).shape[-3] != P(k).shape[-3]:
        rep = P(q).shape[-3] // P(k).shape[-3]
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    w = torch.matmul(q, k.transpose(-2, -1)) * s
    if causal:
        w = w.masked_fill(~_top_left_causal(L, S, P(q).device), float("-inf"))
    if mask is not None:
        mp = P(mask)
        w = w.masked_fill(~mp, float("-inf")) if mp.dtype == torch.bool else w + mask
    return torch.matmul(torch.softmax(w, dim=-1), v)


def dual_interface(impl: str, original):
    """An attention function with transformers' interface (module, query (B, H, L, D), key / value
    (B, Hkv, S, D), attention_mask, dropout, scaling, **kwargs) -> (output (B, L, H, D), None) that
    runs the fused dual kernel when q, k or v carries tangents, else ``original``."""
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        duals = type(query) is Dual or type(key) is Dual or type(value) is Dual
        if not duals or type(attention_mask) is Dual or _bad_kwargs(kwargs) or P(query).dim() != 4:
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if dropout:
            raise UnsupportedModelError(f"fwdllm: attention dropout {dropout} in a dual forward (eval mode only)")
        L = P(query).shape[2]
        mask = attention_mask
        causal = False
        if impl != "eager" and mask is None:
            c = kwargs.get("is_causal")
            c = getattr(module, "is_causal", True) if c is None else c
            causal = bool(c) and L > 1
            if causal and L != P(key).shape[2]:
                mask, causal = _top_left_causal(L, P(key).shape[2], P(query).device), False
        if mask is not None:
            mask = P(mask)[..., :P(key).shape[2]]
        if LAZY.on:
            return _lazy_attention(module, query, key, value, attention_mask, mask, causal, dropout, scaling,
                                   kwargs, original), None
        o, od = _dual_attention(query, key, value, mask, causal, scaling)
        out = o.transpose(1, 2).contiguous()
        return make_dual(out, od.transpose(2, 3).contiguous()), None
    attention.__name__ = f"fwdllm_dual_{impl}"
    return attention


def _lazy_attention(module, query, key, value, attention_mask, mask, causal, dropout, scaling, kwargs, original):
    """Lazy mode: the primal by the model's own function now; the tangent (B, L, H, D) when asked, for the
    query rows asked (keys and values whole)."""
    out = original(module, P(query), P(key), P(value), P(attention_mask), dropout=dropout, scaling=scaling,
                   **kwargs)[0]
    L, S = P(query).shape[2], P(key).shape[2]
    K = next(tangent_K(t) for t in (query, key, value) if type(t) is Dual)

    def fn(dim, idx):
        if dim is None:
            o, od = _dual_attention(query, key, value, mask, causal, scaling)
            return od.transpose(2, 3).contiguous()
        m = mask
        if dim == 0:  # a subset of the batch: everything restricted to it
            q, k, v = (make_dual(P(t).index_select(0, idx), rows_of(t, 0, idx, 4)) if type(t) is Dual
                       else t.index_select(0, idx) for t in (query, key, value))
            if m is not None and m.dim() == 4 and m.shape[0] > 1:
                m = m.index_select(0, idx)
            return _dual_attention(q, k, v, m, causal, scaling)[1].transpose(2, 3).contiguous()
        q = P(query).index_select(2, idx)
        qd = rows_of(query, 2, idx, 4)
        if m is not None and m.dim() >= 2 and m.shape[-2] > 1:
            m = m.index_select(m.dim() - 2, idx)
        if causal:  # bottom-right aligned, for the absolute positions idx
            m = torch.arange(S, device=q.device)[None, :] <= (idx[:, None] + (S - L))
        qt = make_dual(q, qd) if qd is not None else q
        o, od = _dual_attention(qt, key, value, m, False, scaling)
        return od.transpose(2, 3).contiguous()
    STATS.add("fused", "attention")
    return make_dual(out, Lazy(K, out.shape, out.dtype, fn, {0, 1}))


def _sdpa_plain(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


_REGISTERED = False


def register_interface():
    """Register ``"fwdllm_dual"`` with transformers (attention function and its mask function: sdpa's)."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except Exception:  # transformers missing or too old: the engine still routes via get_interface
        return
    AttentionInterface.register(NAME, dual_interface("sdpa", _sdpa_plain))
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _REGISTERED = True


@contextlib.contextmanager
def routed():
    """While active, transformers' attention lookups return the dual interface over the model's own
    function (see the module docstring)."""
    try:
        from transformers.modeling_utils import AttentionInterface
    except Exception:
        yield
        return
    register_interface()
    orig = AttentionInterface.get_interface

    def get_interface(self, attn_implementation, default):
        fn = orig(self, attn_implementation, default)
        if getattr(fn, "__name__", "").startswith("fwdllm_dual"):
            return fn
        return dual_interface(attn_implementation or "eager", fn)

    AttentionInterface.get_interface = get_interface
    try:
        yield
    finally:
        AttentionInterface.get_interface = orig
