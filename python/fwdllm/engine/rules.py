"""Tangent rules of the dual engine, one per torch function / tensor method (see ``core.register``).

Every rule computes the primal with the plain op on the primals, then the K tangents, and returns
Duals for the outputs that carry one. Tangents keep the primal's dims behind a leading K, so a shape
op is the same op on the tangent with its dims shifted by one; elementwise rules compute the
derivative coefficient once on the primal (..., d) and broadcast it over K. Ops without a rule here
take ``core.generic`` (vmap of torch.func.jvp of the op).

Kinds (``core.STATS``): ``fused`` for rules that call a fwdkernels kernel (linear / LoRA linear,
attention, norms, activations, embedding, losses), ``rule`` for the closed forms in torch ops.
"""
from __future__ import annotations

import math
import string

import torch
import torch.nn.functional as F

import fwdkernels as fk
from fwdkernels import dual_ops as D

from .core import (LAZY, STATS, Dual, Lazy, Seeded, UnsupportedModelError, dense_like, dispatch, flush_lazy, generic,
                   is_lazy, lazy_out, lift, make_dual, P, plain_call, prim_rows, promote, register, rows_of, take_sole,
                   tan, tangent_K, writable_tangent, wrap_out)

T = torch.Tensor


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _ndim_dim(d, n):
    """Normalise a dim index for a tensor of n dims."""
    if d < 0:
        d += n
    return d


def _cast(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _rule(kind="rule", shape_only_args=False):
    """Decorator for a single-input rule body ``fn(x Dual, out plain, args, kwargs) -> tangent``: the
    primal comes from the plain op. A Dual in another argument takes the generic rule, unless
    ``shape_only_args`` (the other arguments only give a shape, e.g. ``view_as(other)``)."""
    def deco(fn):
        def rule(func, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if type(x) is not Dual or (not shape_only_args and (any(type(a) is Dual for a in args[1:]) or
                                                               any(type(v) is Dual for v in kwargs.values()))):
                return generic(func, args, kwargs)
            out = plain_call(func, args, kwargs)
            if out is x._plain:
                return x
            t = fn(x, out, args, kwargs)
            STATS.add(kind, fn.__name__)
            return make_dual(out, t) if t is not None else out
        rule.__name__ = fn.__name__
        return rule
    return deco


def _rshape(shape, dim, idx):
    """shape with dim cut to len(idx) (a row request), or shape itself (dim None)."""
    if dim is None:
        return tuple(shape)
    s = list(shape)
    s[dim] = idx.numel()
    return tuple(s)


def _lazy_map(x, out, dmap, apply, merge=None):
    """A lazy shape op: output dim j reads input dim dmap[j]; apply(t, dim, idx) turns the input's
    (restricted) tangent into the output's."""
    src = x._tan

    def fn(dim, idx):
        t = src.full() if dim is None else src.get(dmap[dim], idx)
        return apply(t, dim, idx)
    return make_dual(out, Lazy(src.K, out.shape, out.dtype, fn, dmap.keys(), merge))


def _reshape_map(ins, outs):
    """{out dim: in dim} for the dims a reshape keeps whole (same size, same element count before it)."""
    pre_in = [math.prod(ins[:i]) for i in range(len(ins))]
    m = {}
    for j, sz in enumerate(outs):
        po = math.prod(outs[:j])
        for i, (pi, si) in enumerate(zip(pre_in, ins)):
            if pi == po and si == sz and sz != 1:
                m[j] = i
                break
    return m


# ---------------------------------------------------------------------------------------------
# shape ops: the same op on the tangent, dims shifted by one


@_rule(shape_only_args=True)
def reshape_like(x, out, args, kwargs):
    # view / reshape / flatten / unflatten / squeeze / unsqueeze keep the row-major element order
    if not isinstance(out, torch.Tensor) or out.dtype != x._plain.dtype:
        raise UnsupportedModelError(f"fwdllm: a dtype-reinterpreting view of a tensor with tangents ({x.dtype} -> "
                                    f"{getattr(out, 'dtype', None)}) has no tangent")
    if is_lazy(x):
        ins, outs = tuple(x._plain.shape), tuple(out.shape)
        merge = (x, ins) if len(ins) >= 2 and len(outs) == len(ins) - 1 and outs[0] == ins[0] * ins[1] \
            and outs[1:] == ins[2:] else None
        K = x._tan.K
        return _lazy_map(x, out, _reshape_map(ins, outs),
                         lambda t, dim, idx: t.reshape(K, *_rshape(outs, dim, idx)), merge)._tan
    t = tan(x)
    return t.reshape(t.shape[0], *out.shape)


register(T.view, T.reshape, torch.reshape, T.view_as, T.reshape_as, T.flatten, torch.flatten, T.unflatten,
         torch.unflatten, T.squeeze, torch.squeeze, T.unsqueeze, torch.unsqueeze, T.ravel, torch.ravel)(reshape_like)


@_rule(shape_only_args=True)
def expand(x, out, args, kwargs):
    t = tan(x)
    return lift(t, out.dim()).expand(t.shape[0], *out.shape)


register(T.expand, T.expand_as, T.broadcast_to, torch.broadcast_to)(expand)


@_rule()
def repeat(x, out, args, kwargs):
    sizes = args[1:] if len(args) > 2 or not isinstance(_arg(args, kwargs, 1, "repeats"), (tuple, list, torch.Size)) \
        else _arg(args, kwargs, 1, "repeats")
    if "sizes" in kwargs:
        sizes = kwargs["sizes"]
    t = lift(tan(x), len(sizes))
    return t.repeat(1, *sizes)


register(T.repeat)(repeat)


@_rule()
def transpose(x, out, args, kwargs):
    n = x._plain.dim()
    d0 = _ndim_dim(_arg(args, kwargs, 1, "dim0"), n)
    d1 = _ndim_dim(_arg(args, kwargs, 2, "dim1"), n)
    if is_lazy(x):
        perm = list(range(n))
        perm[d0], perm[d1] = d1, d0
        return _lazy_map(x, out, dict(enumerate(perm)), lambda t, dim, idx: t.transpose(d0 + 1, d1 + 1))._tan
    return tan(x).transpose(d0 + 1, d1 + 1)


register(T.transpose, torch.transpose, T.swapaxes, torch.swapaxes, T.swapdims, torch.swapdims)(transpose)


@_rule()
def matrix_t(x, out, args, kwargs):
    t = tan(x)
    return t if x._plain.dim() < 2 else t.transpose(1, 2)


register(T.t, torch.t, T.T.__get__)(matrix_t)


@_rule()
def matrix_mt(x, out, args, kwargs):
    return tan(x).transpose(-1, -2)


register(T.mT.__get__)(matrix_mt)


@_rule()
def permute(x, out, args, kwargs):
    dims = args[1:] if len(args) > 2 or isinstance(_arg(args, kwargs, 1, "dims"), int) else _arg(args, kwargs, 1, "dims")
    n = x._plain.dim()
    perm = [_ndim_dim(d, n) for d in dims]
    if is_lazy(x):
        return _lazy_map(x, out, dict(enumerate(perm)), lambda t, dim, idx: t.permute(0, *[d + 1 for d in perm]))._tan
    return tan(x).permute(0, *[d + 1 for d in perm])


register(T.permute, torch.permute)(permute)


@_rule()
def movedim(x, out, args, kwargs):
    n = x._plain.dim()
    src, dst = _arg(args, kwargs, 1, "source"), _arg(args, kwargs, 2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    return tan(x).movedim([_ndim_dim(s, n) + 1 for s in src], [_ndim_dim(d, n) + 1 for d in dst])


register(T.movedim, torch.movedim, T.moveaxis, torch.moveaxis)(movedim)


def _lazy_same(x, out, apply):
    """A lazy elementwise-in-place-of-shape op (contiguous, clone, cast): same dims in and out."""
    return _lazy_map(x, out, {d: d for d in range(out.dim())}, lambda t, dim, idx: apply(t))._tan


@_rule()
def contiguous(x, out, args, kwargs):
    if is_lazy(x):
        return _lazy_same(x, out, lambda t: t.contiguous())
    return tan(x).contiguous()


register(T.contiguous)(contiguous)


@_rule()
def clone(x, out, args, kwargs):
    if is_lazy(x):
        return _lazy_same(x, out, lambda t: t.clone())
    return tan(x).clone()


register(T.clone, torch.clone)(clone)


def _no_tangent(func, args, kwargs):
    from .core import DROPS
    DROPS.n += 1
    return plain_call(func, args, kwargs)


register(T.detach, torch.detach, T.data.__get__)(_no_tangent)


@_rule(shape_only_args=True)
def cast(x, out, args, kwargs):
    if not isinstance(out, torch.Tensor) or not (out.is_floating_point() or out.is_complex()):
        return None
    if is_lazy(x):
        return _lazy_same(x, out, lambda t: t.to(dtype=out.dtype, device=out.device))
    t = tan(x)
    return t.to(dtype=out.dtype, device=out.device)


register(T.to, T.float, T.double, T.half, T.bfloat16, T.type, T.type_as, T.cpu, T.cuda)(cast)


def _index_tuple(idx):
    return idx if isinstance(idx, tuple) else (idx,)


def _advanced(i):
    return isinstance(i, (torch.Tensor, list)) and not (isinstance(i, torch.Tensor) and i.dim() == 0
                                                       and not i.dtype == torch.bool)


@register(T.__getitem__)
def getitem(func, args, kwargs):
    x, idx = args
    if type(x) is not Dual:
        return plain_call(func, args, kwargs)
    idx = _index_tuple(P(idx) if type(idx) is Dual else idx)
    if any(type(i) is Dual for i in idx):
        return generic(func, args, kwargs)
    out = x._plain[idx]
    # prepending a full slice is exact unless several advanced indices are separated (numpy puts
    # their dims first, where the K dim is)
    adv = [k for k, i in enumerate(idx) if _advanced(i)]
    if len(adv) > 1 and adv[-1] - adv[0] + 1 != len(adv):
        return generic(func, args, kwargs)
    STATS.add("rule", "getitem")
    if is_lazy(x):
        z = _lazy_getitem(x, out, idx)
        if z is not None:
            return make_dual(out, z)
    return make_dual(out, tan(x)[(slice(None),) + idx])


def _norm_index(idx, shape):
    """The index with Ellipsis expanded: one component per input dim (plus Nones), or None if it has
    bool masks."""
    n = len(shape)
    used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx) or any(isinstance(i, bool) for i in idx):
        return None
    out = []
    for i in idx:
        if i is Ellipsis:
            out += [slice(None)] * (n - used)
        else:
            out.append(i)
    k = sum(1 for i in out if i is not None)
    return out + [slice(None)] * (n - k)


def _full_slice(c, size):
    return isinstance(c, slice) and c.step in (None, 1) and (c.start in (None, 0)) and (c.stop is None or c.stop >= size)


def _lazy_getitem(x, out, idx):
    """The Lazy tangent of x[idx] for a lazy x, or None (then the whole tangent is indexed).

    A restricting component (an int, a partial slice or one integer index tensor) on input dim i asks
    x only for those rows: the whole output tangent is x.get(i, rows)[index remapped]. Output dims
    taken whole from input dims stay row-wise."""
    shape = tuple(x._plain.shape)
    comps = _norm_index(idx, shape)
    if comps is None:
        return None
    src, K = x._tan, x._tan.K
    dmap, restr = {}, []
    i = j = 0
    for c in comps:
        if c is None:
            j += 1
            continue
        if isinstance(c, int) and not isinstance(c, bool):
            restr.append(i)
        elif isinstance(c, slice):
            if _full_slice(c, shape[i]):
                dmap[j] = i
            else:
                restr.append(i)
            j += 1
        elif isinstance(c, (torch.Tensor, list)):
            restr.append(i)
            j += 1  # advanced dims: only full() is served
        else:
            return None
        i += 1
    adv = [k for k, c in enumerate(comps) if isinstance(c, (torch.Tensor, list))]
    if adv:
        dmap = {}
    # the component restricting the request: the last advanced index (the position index of
    # x[arange(B), positions]), else the first int / partial slice
    pick = None
    in_pos = [k for k, c in enumerate(comps) if c is not None]  # component index of each input dim
    if adv:
        pick = adv[-1]
    elif restr:
        pick = in_pos[restr[0]]
    pick_dim = None if pick is None else in_pos.index(pick)

    def fn(dim, rows):
        if dim is not None:  # a dim taken whole from x: restrict x there, index the rest
            return src.get(dmap[dim], rows)[(slice(None),) + tuple(comps)]
        if pick is None:
            return src.full()[(slice(None),) + tuple(comps)]
        c = comps[pick]
        size = shape[pick_dim]
        cs = list(comps)
        if isinstance(c, int):
            sel = torch.tensor([c % size])
            cs[pick] = 0
        elif isinstance(c, slice):
            sel = torch.arange(size)[c]
            cs[pick] = slice(None)
        else:
            t = torch.as_tensor(c).reshape(-1) % size
            sel, inv = torch.unique(t, return_inverse=True)
            cs[pick] = inv.reshape(torch.as_tensor(c).shape)
        sel = sel.to(x._plain.device)
        return src.get(pick_dim, sel)[(slice(None),) + tuple(cs)]
    # an index that restricts rows itself serves only whole requests: a request on another dim could not
    # carry both restrictions (one restricted dim per request)
    return Lazy(K, out.shape, out.dtype, fn, () if pick is not None else dmap.keys())


@_rule()
def select(x, out, args, kwargs):
    d = _ndim_dim(_arg(args, kwargs, 1, "dim"), x._plain.dim())
    return tan(x).select(d + 1, _arg(args, kwargs, 2, "index"))


register(T.select, torch.select)(select)


@_rule()
def narrow(x, out, args, kwargs):
    d = _ndim_dim(_arg(args, kwargs, 1, "dim"), x._plain.dim())
    return tan(x).narrow(d + 1, _arg(args, kwargs, 2, "start"), _arg(args, kwargs, 3, "length"))


register(T.narrow, torch.narrow)(narrow)


@_rule()
def index_select(x, out, args, kwargs):
    d = _ndim_dim(_arg(args, kwargs, 1, "dim"), x._plain.dim())
    return tan(x).index_select(d + 1, _arg(args, kwargs, 2, "index"))


register(T.index_select, torch.index_select)(index_select)


@_rule()
def gather(x, out, args, kwargs):
    d = _ndim_dim(_arg(args, kwargs, 1, "dim"), x._plain.dim())
    index = _arg(args, kwargs, 2, "index")
    t = tan(x)
    return t.gather(d + 1, index.unsqueeze(0).expand(t.shape[0], *index.shape))


register(T.gather, torch.gather, torch.take_along_dim, T.take_along_dim)(gather)


def _split_rule(dim_pos, default_dim=0):
    def rule(func, args, kwargs):
        x = args[0]
        if type(x) is not Dual or any(type(a) is Dual for a in args[1:]):
            return generic(func, args, kwargs)
        outs = plain_call(func, args, kwargs)
        d = _ndim_dim(_arg(args, kwargs, dim_pos, "dim", default_dim), x._plain.dim())
        a2 = list(args)
        kw2 = dict(kwargs)
        if len(a2) > dim_pos:
            a2[dim_pos] = d + 1
        else:
            kw2["dim"] = d + 1
        a2[0] = tan(x)
        touts = func(*a2, **kw2)
        STATS.add("rule", "split")
        return type(outs)(make_dual(o, t) for o, t in zip(outs, touts))
    return rule


register(T.split, torch.split, T.chunk, torch.chunk, T.tensor_split, torch.tensor_split, T.split_with_sizes)(
    _split_rule(2))
register(T.unbind, torch.unbind)(_split_rule(1))


def _seq_rule(stack):
    def rule(func, args, kwargs):
        ts = _arg(args, kwargs, 0, "tensors")
        if not any(type(a) is Dual for a in ts):
            return plain_call(func, args, kwargs)
        d = _arg(args, kwargs, 1, "dim", 0)
        out = plain_call(func, args, kwargs)
        d = _ndim_dim(d, out.dim())
        K = next(tangent_K(a) for a in ts if type(a) is Dual)
        n = out.dim()
        keep = [a for a in ts if not (not stack and P(a).dim() == 1 and P(a).numel() == 0 and n > 1)]

        def fn(dim, idx):
            parts = []
            for a in keep:
                t = rows_of(a, dim, idx, n)
                if t is None:
                    pa = prim_rows(a, dim, idx, n)
                    t = pa.new_zeros((K, *pa.shape), dtype=out.dtype)
                parts.append(t.to(out.dtype))
            return (torch.stack if stack else torch.cat)(parts, d + 1)
        STATS.add("rule", "stack" if stack else "cat")
        if LAZY.on and not stack and any(is_lazy(a) for a in ts) and all(P(a).dim() == n for a in keep):
            return make_dual(out, Lazy(K, out.shape, out.dtype, fn, [i for i in range(n) if i != d]))
        return make_dual(out, fn(None, None))
    return rule


register(torch.cat, torch.concat, torch.concatenate)(_seq_rule(False))
register(torch.stack)(_seq_rule(True))


@_rule()
def flip(x, out, args, kwargs):
    dims = _arg(args, kwargs, 1, "dims")
    dims = [dims] if isinstance(dims, int) else dims
    n = x._plain.dim()
    return tan(x).flip([_ndim_dim(d, n) + 1 for d in dims])


register(T.flip, torch.flip)(flip)


@_rule()
def _constant_pad(x, out, args, kwargs):
    return F.pad(tan(x), _arg(args, kwargs, 1, "pad"))  # the padding value is a constant: zero tangent


@register(F.pad)
def pad(func, args, kwargs):
    if _arg(args, kwargs, 2, "mode", "constant") != "constant":
        return generic(func, args, kwargs)  # reflect / replicate / circular: the generic rule
    return _constant_pad(func, args, kwargs)


@register(T.masked_fill, torch.masked_fill)
def masked_fill(func, args, kwargs):
    x, mask, value = args[0], _arg(args, kwargs, 1, "mask"), _arg(args, kwargs, 2, "value")
    if type(value) is Dual or type(mask) is Dual:
        return generic(func, args, kwargs)
    out = plain_call(func, args, kwargs)
    if type(x) is not Dual:
        return out
    STATS.add("rule", "masked_fill")
    return make_dual(out, tan(x).masked_fill(mask, 0))


@register(torch.where, T.where)
def where(func, args, kwargs):
    if len(args) + len(kwargs) < 3:
        return plain_call(func, args, kwargs)  # where(cond): indices
    if func is T.where:  # x.where(cond, y) = where(cond, x, y)
        x, cond, y = args[0], _arg(args, kwargs, 1, "condition"), _arg(args, kwargs, 2, "other")
    else:
        cond, x, y = _arg(args, kwargs, 0, "condition"), _arg(args, kwargs, 1, "input"), _arg(args, kwargs, 2, "other")
    out = plain_call(func, args, kwargs)
    tx, ty = tan(x), tan(y)
    if tx is None and ty is None:
        return out
    n = out.dim()
    zero = torch.zeros((), dtype=out.dtype, device=out.device)
    t = torch.where(P(cond), lift(tx, n) if tx is not None else zero, lift(ty, n) if ty is not None else zero)
    K = tangent_K(x if tx is not None else y)
    STATS.add("rule", "where")
    return make_dual(out, dense_like(t.to(out.dtype), out.shape, K))


# ---------------------------------------------------------------------------------------------
# elementwise ops: fn(dim, idx) computes the tangent (restricted to a row request or whole) from the
# inputs' tangents and primals under the same request; lazy when an input's tangent is


def _elementwise_out(out, inputs, fn, kind="rule", name="elementwise", force_lazy=False):
    """Wrap the output of an elementwise op: lazy in lazy mode when an input is lazy (or force_lazy: a
    rule whose cost is worth deferring), else the tangent now."""
    STATS.add(kind, name)
    K = next(tangent_K(a) for a in inputs if type(a) is Dual)
    if LAZY.on and (force_lazy or any(is_lazy(a) for a in inputs)):
        return make_dual(out, Lazy(K, out.shape, out.dtype, fn, range(out.dim())))
    return make_dual(out, fn(None, None))


def _binary_linear(sign_b, swap=False):
    """add / sub / rsub with alpha: out = a + s alpha b (swap: the rsub order, out = b - alpha a)."""
    def rule(func, args, kwargs):
        a, b = args[0], _arg(args, kwargs, 1, "other")
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        if type(alpha) is Dual:
            return generic(func, args, kwargs)
        out = plain_call(func, args, kwargs)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return out
        ca, cb = (-alpha, 1) if swap else (1, sign_b * alpha)
        n = out.dim()
        one = type(a) is not Dual or type(b) is not Dual
        if one and not LAZY.on:
            src, c = (a, ca) if type(a) is Dual else (b, cb)
            t = tan(src)
            if c == 1 and tuple(P(src).shape) == tuple(out.shape) and t.dtype == out.dtype:
                STATS.add("rule", "add")
                return wrap_out(out, t, shared_with=src)  # the input's tangent, unchanged: shared

        def fn(dim, idx):
            ta, tb = rows_of(a, dim, idx, n), rows_of(b, dim, idx, n)
            t = None
            if ta is not None:
                t = lift(ta, n) if ca == 1 else lift(ta, n) * ca
            if tb is not None:
                u = lift(tb, n) if cb == 1 else lift(tb, n) * cb
                t = u if t is None else t + u
            return dense_like(_cast(t, out.dtype), _rshape(out.shape, dim, idx), t.shape[0])
        return _elementwise_out(out, (a, b), fn, name="add")
    return rule


register(T.add, torch.add, T.__radd__, T.__add__)(_binary_linear(1))
register(T.sub, torch.sub, T.subtract, torch.subtract, T.__sub__)(_binary_linear(-1))
register(torch.rsub, T.__rsub__)(_binary_linear(-1, swap=True))


@register(T.neg, torch.neg, T.negative, torch.negative, T.__neg__)
def neg(func, args, kwargs):
    x = args[0]
    out = plain_call(func, args, kwargs)
    return _elementwise_out(out, (x,), lambda dim, idx: -rows_of(x, dim, idx, out.dim()), name="neg")


def _deferred_silu(v):
    z = getattr(v, "_tan", None) if type(v) is Dual else None
    return type(z) is Lazy and z.fn is not None and z.act is not None and z.act[0] == "silu" and z.act[1]


def _gated(out, s, u):
    """silu(gate) * up with silu's tangent still deferred: one fused pass (gated_mlp_act_dual), in place
    on the gate's tangent when the model has dropped the gate."""
    cell = s._tan.act[1]
    gp, up_ = cell[0]._plain, P(u)
    n = out.dim()
    K = s._tan.K

    def fn(dim, idx):
        if dim is None:
            g, excl = take_sole(cell)
            gd, ud = tan(g), tan(u)
            return D.gated_mlp_act_dual(gp, _cast(gd, gp.dtype), _cast(up_, gp.dtype), _cast(ud, gp.dtype),
                                        inplace=excl and gd.dtype == gp.dtype)[1]
        g = cell[0]
        return D.gated_mlp_act_dual(prim_rows(gp, dim, idx, n), _cast(rows_of(g, dim, idx, n), gp.dtype),
                                    _cast(prim_rows(up_, dim, idx, n), gp.dtype),
                                    _cast(rows_of(u, dim, idx, n), gp.dtype))[1]
    STATS.add("fused", "gated_act")
    if LAZY.on:
        return make_dual(out, Lazy(K, out.shape, out.dtype, fn, range(n)))
    return make_dual(out, _cast(fn(None, None), out.dtype))


@register(T.mul, torch.mul, T.multiply, torch.multiply, T.__mul__, T.__rmul__)
def mul(func, args, kwargs):
    a, b = args[0], _arg(args, kwargs, 1, "other")
    out = plain_call(func, args, kwargs)
    n = out.dim()
    for s_, u_ in ((a, b), (b, a)):
        if _deferred_silu(s_) and isinstance(u_, torch.Tensor) and tuple(P(u_).shape) == tuple(out.shape) \
                and tuple(P(s_).shape) == tuple(out.shape) and P(u_).dtype == out.dtype:
            return _gated(out, s_, u_)

    def fn(dim, idx):
        ta, tb = rows_of(a, dim, idx, n), rows_of(b, dim, idx, n)
        t = None
        if ta is not None:
            t = lift(ta, n) * prim_rows(b, dim, idx, n)
        if tb is not None:
            u = prim_rows(a, dim, idx, n) * lift(tb, n)
            t = u if t is None else t.add_(u) if t.shape == u.shape else t + u
        return dense_like(_cast(t, out.dtype), _rshape(out.shape, dim, idx), t.shape[0])
    return _elementwise_out(out, (a, b), fn, name="mul")


@register(T.div, torch.div, T.divide, torch.divide, T.true_divide, torch.true_divide, T.__truediv__)
def div(func, args, kwargs):
    a, b = args[0], _arg(args, kwargs, 1, "other")
    if kwargs.get("rounding_mode") is not None:
        return plain_call(func, args, kwargs)  # piecewise constant
    out = plain_call(func, args, kwargs)
    n = out.dim()

    def fn(dim, idx):
        ta, tb = rows_of(a, dim, idx, n), rows_of(b, dim, idx, n)
        pb = prim_rows(b, dim, idx, n)
        t = None
        if ta is not None:
            t = lift(ta, n) / pb
        if tb is not None:
            u = lift(tb, n) * (prim_rows(out, dim, idx, n) / pb)
            t = -u if t is None else t - u
        return dense_like(_cast(t, out.dtype), _rshape(out.shape, dim, idx), t.shape[0])
    return _elementwise_out(out, (a, b), fn, name="div")


@register(T.__rdiv__, T.__rtruediv__)
def rdiv(func, args, kwargs):
    x, c = args[0], args[1]  # c / x
    if type(c) is Dual:
        return generic(func, args, kwargs)
    out = plain_call(func, args, kwargs)
    coef = -out / x._plain
    n = out.dim()
    return _elementwise_out(out, (x,), lambda dim, idx: _cast(rows_of(x, dim, idx, n) * prim_rows(coef, dim, idx, n),
                                                              out.dtype), name="rdiv")


# ---------------------------------------------------------------------------------------------
# elementwise, nonlinear: t * f'(x), the coefficient computed once on the primal


def _coef_out(x, out, coef, name, kind="rule", force_lazy=False):
    """y_dot = coef * x_dot with a primal-shaped coefficient."""
    n = out.dim()
    return _elementwise_out(out, (x,), lambda dim, idx: _cast(rows_of(x, dim, idx, n) * prim_rows(coef, dim, idx, n),
                                                              out.dtype), kind, name, force_lazy)


def _unary(coef):
    """Rule for y = f(x) with y_dot = f'(x) x_dot, coef(x, y, args, kwargs) = f'(x) (primal-shaped)."""
    def rule(func, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        if type(x) is not Dual or any(type(a) is Dual for a in args[1:]) or \
                any(type(v) is Dual for v in kwargs.values()):
            return generic(func, args, kwargs)
        out = plain_call(func, args, kwargs)
        return _coef_out(x, out, coef(x._plain, out, args, kwargs), coef.__name__)
    rule.__name__ = coef.__name__
    return rule


def _c_exp(x, y, a, k):
    return y


def _c_log(x, y, a, k):
    return 1.0 / x


def _c_sqrt(x, y, a, k):
    return 0.5 / y


def _c_rsqrt(x, y, a, k):
    return -0.5 * y * y * y


def _c_reciprocal(x, y, a, k):
    return -(y * y)


def _c_sigmoid(x, y, a, k):
    return y * (1 - y)


def _c_sin(x, y, a, k):
    return torch.cos(x)


def _c_cos(x, y, a, k):
    return -torch.sin(x)


def _c_abs(x, y, a, k):
    return torch.sign(x)


def _c_relu(x, y, a, k):
    return (x > 0).to(x.dtype)


def _c_erf(x, y, a, k):
    return (2.0 / math.sqrt(math.pi)) * torch.exp(-x * x)


def _c_square(x, y, a, k):
    return 2 * x


def _c_log1p(x, y, a, k):
    return 1.0 / (1 + x)


def _c_expm1(x, y, a, k):
    return y + 1


def _c_clamp(x, y, a, k):
    lo, hi = _arg(a, k, 1, "min"), _arg(a, k, 2, "max")
    m = torch.ones_like(x, dtype=torch.bool)
    if lo is not None:
        m &= x >= lo
    if hi is not None:
        m &= x <= hi
    return m.to(x.dtype)


for _f, _c in ((("exp",), _c_exp), (("log",), _c_log), (("sqrt",), _c_sqrt), (("rsqrt",), _c_rsqrt),
               (("reciprocal",), _c_reciprocal), (("sigmoid",), _c_sigmoid), (("sin",), _c_sin),
               (("cos",), _c_cos), (("abs", "absolute", "__abs__"), _c_abs), (("relu",), _c_relu),
               (("erf",), _c_erf), (("square",), _c_square), (("log1p",), _c_log1p), (("expm1",), _c_expm1)):
    _r = _unary(_c)
    for _n in _f:
        register(getattr(T, _n, None), getattr(torch, _n, None))(_r)
register(F.relu, torch.relu)(_unary(_c_relu))
register(torch.sigmoid, F.sigmoid)(_unary(_c_sigmoid))


@register(T.clamp, torch.clamp, T.clip, torch.clip, T.clamp_min, T.clamp_max, torch.clamp_min, torch.clamp_max)
def clamp(func, args, kwargs):
    name = func.__name__
    if any(isinstance(a, torch.Tensor) for a in args[1:]) or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        return generic(func, args, kwargs)
    if name == "clamp_min":
        a, k = (args[0], args[1], None), {}
    elif name == "clamp_max":
        a, k = (args[0], None, args[1]), {}
    else:
        a, k = args, kwargs
    x = args[0]
    out = plain_call(func, args, kwargs)
    return _coef_out(x, out, _c_clamp(x._plain, out, a, k), "clamp")


@register(T.pow, torch.pow, T.__pow__)
def pow_(func, args, kwargs):
    x, e = args[0], _arg(args, kwargs, 1, "exponent")
    if type(x) is not Dual or isinstance(e, torch.Tensor):
        return generic(func, args, kwargs)
    out = plain_call(func, args, kwargs)
    xp = x._plain
    if e == 2:
        c = 2 * xp
    elif e == 0:
        c = torch.zeros_like(xp)
    else:
        c = e * xp.pow(e - 1)
    return _coef_out(x, out, c, "pow")


def _fused_act(fn, name, inplace_ok=False, **kw):
    """An activation with a fused dual kernel. Its tangent is always deferred one step (a Lazy): the
    consumer computes it, in place on the input's tangent when the model has dropped the input (the
    usual up-projection -> activation -> down-projection), or fuses it (silu(gate) * up)."""
    def rule(func, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if type(x) is not Dual or any(type(a) is Dual for a in args[1:]) or kwargs.get("inplace") or \
                (len(args) > 1 and isinstance(args[-1], bool) and args[-1]):
            return generic(func, args, kwargs)
        out = plain_call(func, args, kwargs)
        extra = {k: _arg(args, kwargs, 1, k, v) for k, v in kw.items()}
        STATS.add("fused", name)

        def compute(xs, t, inplace):
            return fn(xs, t, inplace=True, **extra)[1] if inplace and inplace_ok else fn(xs, t, **extra)[1]
        return deferred(out, x, compute, tangent_K(x), range(out.dim()), act=name)
    return rule


register(F.gelu)(_fused_act(D.gelu_dual, "gelu", inplace_ok=True, approximate="none"))
register(F.silu)(_fused_act(D.silu_dual, "silu"))
register(torch.tanh, T.tanh, F.tanh)(_fused_act(D.tanh_dual, "tanh"))


def _softmax_dim(args, kwargs, n):
    d = _arg(args, kwargs, 1, "dim")
    if d is None:
        raise NotImplementedError
    return _ndim_dim(d, n)


@register(F.softmax, torch.softmax, T.softmax)
def softmax(func, args, kwargs):
    x = args[0]
    if type(x) is not Dual or any(type(a) is Dual for a in args[1:]):
        return generic(func, args, kwargs)
    if _arg(args, kwargs, 1, "dim") is None:
        return generic(func, args, kwargs)
    out = plain_call(func, args, kwargs)
    d = _softmax_dim(args, kwargs, out.dim())
    t = _cast(tan(x), out.dtype)
    s = (t * out).sum(d + 1, keepdim=True)
    STATS.add("rule", "softmax")
    return make_dual(out, (t - s).mul_(out))


@register(F.log_softmax, torch.log_softmax, T.log_softmax)
def log_softmax(func, args, kwargs):
    x = args[0]
    if type(x) is not Dual or any(type(a) is Dual for a in args[1:]) or _arg(args, kwargs, 1, "dim") is None:
        return generic(func, args, kwargs)
    out = plain_call(func, args, kwargs)
    d = _softmax_dim(args, kwargs, out.dim())
    t = _cast(tan(x), out.dtype)
    s = (t * out.exp()).sum(d + 1, keepdim=True)
    STATS.add("rule", "log_softmax")
    return make_dual(out, t - s)


@register(torch.logsumexp, T.logsumexp)
def logsumexp(func, args, kwargs):
    x = args[0]
    if type(x) is not Dual or any(type(a) is Dual for a in args[1:]):
        return generic(func, args, kwargs)
    out = plain_call(func, args, kwargs)
    dims = _arg(args, kwargs, 1, "dim")
    dims = [dims] if isinstance(dims, int) else list(dims)
    keep = _arg(args, kwargs, 2, "keepdim", False)
    xp = x._plain
    n = xp.dim()
    dims = [_ndim_dim(d, n) for d in dims]
    y = out if keep else out.view(*[1 if i in dims else s for i, s in enumerate(xp.shape)])
    p = torch.exp(xp - y)
    t = (tan(x) * p).sum([d + 1 for d in dims], keepdim=keep)
    STATS.add("rule", "logsumexp")
    return make_dual(out, _cast(t, out.dtype))


# ---------------------------------------------------------------------------------------------
# reductions


def _reduce(op):
    def rule(func, args, kwargs):
        x = args[0]
        if type(x) is not Dual or any(type(a) is Dual for a in args[1:]):
            return generic(func, args, kwargs)
        out = plain_call(func, args, kwargs)
        dims = _arg(args, kwargs, 1, "dim")
        keep = _arg(args, kwargs, 2, "keepdim", False)
        dtype = kwargs.get("dtype")
        t = tan(x)
        n = x._plain.dim()
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0 and op == "sum"):
            dims = list(range(n))
        dims = [dims] if isinstance(dims, int) else list(dims)
        r = getattr(t, op)([_ndim_dim(d, n) + 1 for d in dims], keepdim=keep, **({"dtype": dtype} if dtype else {}))
        if n == 0:
            r = t
        STATS.add("rule", op)
        return make_dual(out, _cast(r.reshape(r.shape[0], *out.shape), out.dtype))
    return rule


register(T.sum, torch.sum)(_reduce("sum"))
register(T.mean, torch.mean)(_reduce("mean"))


@register(T.var, torch.var, T.std, torch.std)
def var_std(func, args, kwargs):
    x = args[0]
    if type(x) is not Dual or any(type(a) is Dual for a in args[1:]):
        return generic(func, args, kwargs)
    dims = _arg(args, kwargs, 1, "dim")
    if isinstance(dims, bool):  # var(x, unbiased)
        return generic(func, args, kwargs)
    keep = kwargs.get("keepdim", args[3] if len(args) > 3 else False)
    corr = kwargs.get("correction")
    if corr is None:
        unb = kwargs.get("unbiased", args[2] if len(args) > 2 else True)
        corr = 1 if unb else 0
    out = plain_call(func, args, kwargs)
    xp = x._plain
    n = xp.dim()
    dims = list(range(n)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
    dims = [_ndim_dim(d, n) for d in dims]
    cnt = math.prod(xp.shape[d] for d in dims)
    c = (xp - xp.mean(dims, keepdim=True)) * (2.0 / max(cnt - corr, 1))
    t = (tan(x) * c).sum([d + 1 for d in dims], keepdim=keep)
    if func in (T.std, torch.std):
        t = t / (2 * out)
    STATS.add("rule", "var")
    return make_dual(out, _cast(t, out.dtype))


@register(T.cumsum, torch.cumsum)
def cumsum(func, args, kwargs):
    x = args[0]
    if type(x) is not Dual:
        return generic(func, args, kwargs)
    out = plain_call(func, args, kwargs)
    d = _ndim_dim(_arg(args, kwargs, 1, "dim"), x._plain.dim())
    STATS.add("rule", "cumsum")
    return make_dual(out, _cast(tan(x).cumsum(d + 1), out.dtype))


# ---------------------------------------------------------------------------------------------
# products


@register(T.matmul, torch.matmul, T.__matmul__, T.bmm, torch.bmm, T.mm, torch.mm)
def matmul(func, args, kwargs):
    a, b = args[0], _arg(args, kwargs, 1, "other", kwargs.get("mat2"))
    pa, pb = P(a), P(b)
    if pa.dim() < 2 or pb.dim() < 2:
        return generic(func, args, kwargs)
    out = plain_call(func, args, kwargs)
    n = out.dim()
    ta, tb = tan(a), tan(b)
    t = None
    if ta is not None:
        t = torch.matmul(lift(ta, n), pb)
    if tb is not None:
        u = torch.matmul(pa, lift(tb, n))
        t = u if t is None else t.add_(u)
    K = tangent_K(a if ta is not None else b)
    STATS.add("rule", "matmul")
    return make_dual(out, dense_like(_cast(t, out.dtype), out.shape, K))


@register(torch.einsum)
def einsum(func, args, kwargs):
    eq = args[0]
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    if not isinstance(eq, str) or kwargs:
        return generic(func, args, kwargs)
    out = plain_call(func, args, kwargs)
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return generic(func, args, kwargs)
    lhs, rhs = eq.split("->")
    terms = lhs.split(",")
    free = next(c for c in string.ascii_letters if c not in eq)
    t = None
    K = None
    plain = [P(o) for o in ops]
    for i, o in enumerate(ops):
        to = tan(o)
        if to is None:
            continue
        K = to.shape[0]
        ts = list(terms)
        ts[i] = free + ts[i]
        e = ",".join(ts) + "->" + free + rhs
        opsi = list(plain)
        opsi[i] = to
        u = torch.einsum(e, *opsi)
        t = u if t is None else t.add_(u)
    STATS.add("rule", "einsum")
    return make_dual(out, dense_like(_cast(t, out.dtype), out.shape, K))


# ---------------------------------------------------------------------------------------------
# fused kernels: linear / LoRA linear


def _private(t: torch.Tensor) -> torch.Tensor:
    """A kernel's fresh output reshaped to the caller's shape is a view of a buffer nobody else holds;
    re-seat it as a plain tensor on that storage, so that ownership checks (core.take_sole) see one
    tensor and a consumer may overwrite it in place."""
    if t._base is None:
        return t
    return torch.empty((0,), dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(),
                                                                   t.shape, t.stride())


def _dist_of(*sources):
    for s in sources:
        if type(s) is Seeded:
            return s.dist
    return "rademacher"


def fused_linear(x, W, b, A=None, B=None, scaling=1.0, weight_t=False):
    """The dual of ``y = x W^T + b + s (x A^T) B^T`` through fwdkernels.lora_linear_dual.

    Any of x, W, b, A, B may be a Dual (a trainable parameter's seeded tangent is regenerated inside
    the kernel, never materialised) or plain; ``weight_t``: W is stored (d_in, d_out) (GPT-2 Conv1D).
    A trainable W (dense tangent) takes the small-dense rule. Mixed dtypes (fp32 adapters on a bf16
    base) compute in x's dtype. Returns a Dual, or a plain tensor when nothing carries a tangent."""
    xp = P(x)
    dtype = xp.dtype
    Wp = P(W)
    Wp = Wp.t() if weight_t else Wp
    if type(W) is Dual:
        return _dense_weight_linear(x, W, b, A, B, scaling, weight_t)
    Wp, bp = _cast(Wp, dtype), _cast(P(b), dtype)
    Ap, Bp = _cast(P(A), dtype), _cast(P(B), dtype)
    has_xd = type(x) is Dual
    srcs = [getattr(v, "_tan", None) if type(v) is Dual else None for v in (b, A, B)]
    seeds = None
    kw = {}
    sb, sa, sbb = srcs
    if type(sb) is Seeded:
        seeds, kw["offset_bias"] = sb.seeds, sb.offset
    elif sb is not None:
        kw["bias_dot"] = _cast(tan(b), dtype)
    offA = offB = 0
    if A is not None:
        if type(sa) is Seeded and type(sbb) is Seeded and sa.seeds is sbb.seeds:
            seeds, offA, offB = sa.seeds, sa.offset, sbb.offset
        elif sa is not None or sbb is not None or has_xd or "bias_dot" in kw or seeds is not None:
            K = next(tangent_K(v) for v in (x, b, A, B) if type(v) is Dual)
            kw["A_dot"] = _cast(tan(A), dtype) if sa is not None else Ap.new_zeros((K, *Ap.shape))
            kw["B_dot"] = _cast(tan(B), dtype) if sbb is not None else Bp.new_zeros((K, *Bp.shape))
    if not has_xd and seeds is None and not kw:
        return plain_linear(xp, Wp, bp, Ap, Bp, scaling)
    dist = _dist_of(*srcs)
    STATS.add("fused", "lora_linear" if A is not None else "linear")
    if not LAZY.on:
        y, yd = fk.lora_linear_dual(xp, _cast(tan(x), dtype), Wp, bp, Ap, Bp, scaling, seeds, offA, offB, dist, **kw)
        return make_dual(y, _private(yd))
    # lazy: the primal now (the plain op), the tangents when asked, for the rows asked, without
    # recomputing the primal rows (primal=False)
    y = plain_linear(xp, Wp, bp, Ap, Bp, scaling)
    n = y.dim()
    K = next(tangent_K(v) for v in (x, b, A, B) if type(v) is Dual)

    def fn(dim, idx):
        xs = prim_rows(xp, dim, idx, n)
        xds = _cast(rows_of(x, dim, idx, n), dtype)
        k2 = dict(kw)
        if xds is None and seeds is None and "A_dot" not in k2 and "bias_dot" not in k2:
            return xs.new_zeros((K, *xs.shape[:-1], Wp.shape[0]))
        return _private(fk.lora_linear_dual(xs, xds, Wp, bp, Ap, Bp, scaling, seeds, offA, offB, dist, primal=False,
                                            **k2)[1])
    return make_dual(y, Lazy(K, y.shape, y.dtype, fn, range(n - 1)))


def plain_linear(xp, Wp, bp, Ap=None, Bp=None, scaling=1.0):
    y = F.linear(xp, Wp, bp)
    if Ap is not None:
        y = y + F.linear(F.linear(xp, Ap), Bp) * scaling
    return y


def _dense_weight_linear(x, W, b, A, B, scaling, weight_t):
    """A trainable (dense-tangent) weight: y_dot = x_dot W^T + x W_dot^T + b_dot (+ the LoRA tail by the
    op rules). For classification heads and small dense trainables."""
    xp = P(x)
    dtype = xp.dtype
    Wp = _cast(P(W), dtype)
    Wt = tan(W)
    if weight_t:
        Wp, Wt = Wp.t(), Wt.transpose(1, 2)
    y, yd = D.linear_dual(xp, _cast(tan(x), dtype), Wp, _cast(P(b), dtype), weight_dot=_cast(Wt, dtype),
                          bias_dot=_cast(tan(b), dtype))
    STATS.add("fused", "dense_linear")
    out = make_dual(y, yd)
    if A is not None:
        out = out + F.linear(F.linear(x, A), B) * scaling
    return out


@register(F.linear)
def linear(func, args, kwargs):
    x, W = args[0], _arg(args, kwargs, 1, "weight")
    b = _arg(args, kwargs, 2, "bias")
    return fused_linear(x, W, b)


@register(torch.addmm, T.addmm)
def addmm(func, args, kwargs):
    """GPT-2's Conv1D: addmm(bias, x (M, d_in), W (d_in, d_out))."""
    bias, x, W = args[0], _arg(args, kwargs, 1, "mat1"), _arg(args, kwargs, 2, "mat2")
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or P(bias).dim() != 1:
        return generic(func, args, kwargs)
    return fused_linear(x, W, bias, weight_t=True)


# ---------------------------------------------------------------------------------------------
# fused kernels: norms, embedding, losses, dropout


@register(F.layer_norm)
def layer_norm(func, args, kwargs):
    x = args[0]
    shape = _arg(args, kwargs, 1, "normalized_shape")
    w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    eps = _arg(args, kwargs, 4, "eps", 1e-5)
    if len(shape) != 1:
        return generic(func, args, kwargs)
    xp = P(x)
    out = plain_call(func, args, kwargs)
    dt = xp.dtype
    wp, bp, wd, bd = _cast(P(w), dt), _cast(P(b), dt), _cast(tan(w), dt), _cast(tan(b), dt)
    STATS.add("fused", "layer_norm")
    return deferred(out, x, lambda xs, t, inplace: D.layer_norm_dual(xs, t, wp, bp, eps, weight_dot=wd, bias_dot=bd,
                                                                      inplace=inplace)[1],
                    next(tangent_K(v) for v in (x, w, b) if type(v) is Dual), range(out.dim() - 1))


def deferred(out, x, compute, K, rowwise, act=None):
    """The output of a norm over the last dim or an activation: its tangent ``compute(x rows, x_dot rows,
    inplace)`` deferred one step (always a Lazy, also outside lazy mode), so that it is computed when a
    consumer reads it, in place on x's tangent when the model has dropped x by then (an up-projection
    feeding an activation; a residual sum feeding the block's last norm). ``act`` names an activation,
    so that ``silu(gate) * up`` can take the gate from this node (rules._gated)."""
    n = out.dim()
    xp = P(x)
    cell = [x]
    del x

    def fn(dim, idx):
        if dim is None and type(cell[0]) is Dual:
            xd, excl = take_sole(cell)
            t = tan(xd)
            if t.dtype != xp.dtype:
                t, excl = t.to(xp.dtype), True
            return _cast(compute(xp, t, excl), out.dtype)
        if dim is None:  # x carries no tangent (a trainable weight / bias does)
            return _cast(compute(xp, None, False), out.dtype)
        return _cast(compute(prim_rows(xp, dim, idx, n), _cast(rows_of(cell[0], dim, idx, n), xp.dtype), False),
                     out.dtype)
    return make_dual(out, Lazy(K, out.shape, out.dtype, fn, rowwise, act=None if act is None else (act, cell)))


if hasattr(F, "rms_norm"):
    @register(F.rms_norm)
    def rms_norm(func, args, kwargs):
        x = args[0]
        shape = _arg(args, kwargs, 1, "normalized_shape")
        w = _arg(args, kwargs, 2, "weight")
        eps = _arg(args, kwargs, 3, "eps")
        xp = P(x)
        if len(shape) != 1 or eps is None:
            return generic(func, args, kwargs)
        out = plain_call(func, args, kwargs)
        dt = xp.dtype
        _, yd = D.rms_norm_dual(xp, _cast(tan(x), dt), _cast(P(w), dt), eps, weight_dot=_cast(tan(w), dt))
        STATS.add("fused", "rms_norm")
        return make_dual(out, _cast(yd, out.dtype))


@register(F.embedding)
def embedding(func, args, kwargs):
    ids, W = args[0], _arg(args, kwargs, 1, "weight")
    pad_idx = _arg(args, kwargs, 2, "padding_idx")
    if type(ids) is Dual or _arg(args, kwargs, 3, "max_norm") is not None:
        return generic(func, args, kwargs)
    out = plain_call(func, args, kwargs)
    if type(W) is not Dual:
        return out
    Wp = W._plain
    _, yd = D.embedding_dual(ids, Wp, weight_dot=_cast(tan(W), Wp.dtype), padding_idx=pad_idx)
    STATS.add("fused", "embedding")
    return make_dual(out, yd)


@register(F.cross_entropy)
def cross_entropy(func, args, kwargs):
    x, target = args[0], _arg(args, kwargs, 1, "target")
    weight = _arg(args, kwargs, 2, "weight")
    ignore = _arg(args, kwargs, 4, "ignore_index", -100)
    reduction = _arg(args, kwargs, 6, "reduction", "mean")
    smoothing = _arg(args, kwargs, 7, "label_smoothing", 0.0)
    xp = P(x)
    if (type(x) is not Dual or type(target) is Dual or weight is not None or smoothing or xp.dim() != 2
            or reduction not in ("mean", "sum") or target.dtype.is_floating_point
            or _arg(args, kwargs, 3, "size_average") is not None or _arg(args, kwargs, 5, "reduce") is not None):
        return generic(func, args, kwargs)
    out = plain_call(func, args, kwargs)
    if is_lazy(x):
        ld = _cross_entropy_chunked(x, target, ignore)
    else:
        _, ld = D.cross_entropy_dual(xp, _cast(tan(x), xp.dtype), target, ignore_index=ignore)
    if reduction == "sum":
        ld = ld * (target != ignore).sum().to(ld.dtype)
    STATS.add("fused", "cross_entropy")
    return make_dual(out, _cast(ld, out.dtype))


CE_CHUNK_ELEMS = 1 << 24  # tangent elements of one chunk of lazy logits (K * rows * classes)


def _cross_entropy_chunked(x, target, ignore):
    """Mean cross-entropy tangent (K,) of lazy logits x (N, C) without their whole (K, N, C) tangent: over
    chunks of rows, each asked of the lazy graph (a causal LM's vocabulary projection runs chunk by
    chunk). Logits that are a reshape of (B, L, C) are chunked over L."""
    z = x._tan
    xp = x._plain
    N, C = xp.shape
    K = z.K
    valid = target != ignore
    n = int(valid.sum())
    acc = torch.zeros(K, dtype=torch.float32, device=xp.device)
    if n == 0:
        return acc
    if z.merge is not None:
        src, shape = z.merge
        B, L = shape[0], shape[1]
        lab, lg = target.view(B, L), xp.view(B, L, C)
        step = max(1, CE_CHUNK_ELEMS // max(1, K * B * C))
        for l0 in range(0, L, step):
            idx = torch.arange(l0, min(L, l0 + step), device=xp.device)
            li = lab[:, idx].reshape(-1)
            m = int((li != ignore).sum())
            if m == 0:
                continue
            t = rows_of(src, 1, idx, len(shape)).reshape(K, -1, C)
            _, ld = D.cross_entropy_dual(lg[:, idx].reshape(-1, C), _cast(t, xp.dtype), li, ignore_index=ignore)
            acc += ld.float() * (m / n)
        return acc
    if 0 not in z.rowwise or K * N * C <= CE_CHUNK_ELEMS:
        _, ld = D.cross_entropy_dual(xp, _cast(tan(x), xp.dtype), target, ignore_index=ignore)
        return ld.float()
    step = max(1, CE_CHUNK_ELEMS // max(1, K * C))
    for r0 in range(0, N, step):
        idx = torch.arange(r0, min(N, r0 + step), device=xp.device)
        li = target[idx]
        m = int((li != ignore).sum())
        if m == 0:
            continue
        _, ld = D.cross_entropy_dual(xp[idx], _cast(z.get(0, idx), xp.dtype), li, ignore_index=ignore)
        acc += ld.float() * (m / n)
    return acc


@register(F.mse_loss)
def mse_loss(func, args, kwargs):
    x, target = args[0], _arg(args, kwargs, 1, "target")
    reduction = _arg(args, kwargs, 4, "reduction", "mean")
    xp = P(x)
    if type(x) is not Dual or type(target) is Dual or reduction != "mean" or tuple(target.shape) != tuple(xp.shape) \
            or _arg(args, kwargs, 2, "size_average") is not None or _arg(args, kwargs, 3, "reduce") is not None:
        return generic(func, args, kwargs)
    out = plain_call(func, args, kwargs)
    _, ld = D.mse_loss_dual(xp, _cast(tan(x), xp.dtype), target)
    STATS.add("fused", "mse_loss")
    return make_dual(out, _cast(ld, out.dtype))


@register(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
          torch.dropout, T.dropout if hasattr(T, "dropout") else None)
def dropout(func, args, kwargs):
    x = args[0] if args else kwargs["input"]
    p = _arg(args, kwargs, 1, "p", 0.5)
    training = _arg(args, kwargs, 2, "train" if func is torch.dropout else "training", True)
    if training and p > 0:
        raise UnsupportedModelError(
            f"fwdllm: dropout (p={p}) in training mode inside a dual forward: a random mask makes the primal and "
            "the tangents inconsistent; run in eval mode (the dual engine sets model.eval() for a model's forward)")
    return x


# ---------------------------------------------------------------------------------------------
# in-place ops: written into the target's primal and tangent


def _inplace_binary(outplace):
    def rule(func, args, kwargs):
        target = args[0]
        res = dispatch(outplace, args, kwargs)
        if type(res) is not Dual:
            if type(target) is Dual:
                with torch._C.DisableTorchFunctionSubclass():
                    target._plain.copy_(res)
                writable_tangent(target).zero_()
                return target
            return plain_call(func, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            P(target).copy_(res._plain)
        t = tan(res)
        if type(target) is not Dual:
            promote(target, int(t.shape[0]))
        writable_tangent(target).copy_(dense_like(t, target.shape, int(t.shape[0])))
        return target
    return rule


# Other in-place ops take core.generic_inplace: their out-of-place rule, written back.


@register(T.copy_)
def copy_(func, args, kwargs):
    target, src = args[0], args[1]
    with torch._C.DisableTorchFunctionSubclass():
        P(target).copy_(P(src))
    t = tan(src)
    if t is None:
        if type(target) is Dual:
            writable_tangent(target).zero_()
        return target
    if type(target) is not Dual:
        promote(target, int(t.shape[0]))
    writable_tangent(target).copy_(dense_like(t, target.shape, int(t.shape[0])))
    return target


@register(T.__setitem__)
def setitem(func, args, kwargs):
    target, idx, value = args
    idx = _index_tuple(idx)
    with torch._C.DisableTorchFunctionSubclass():
        P(target)[idx] = P(value)
    t = tan(value)
    if t is None and type(target) is not Dual:
        return None
    if type(target) is not Dual:
        promote(target, int(t.shape[0]))
    tt = writable_tangent(target)
    adv = [k for k, i in enumerate(idx) if _advanced(i)]
    if len(adv) > 1 and adv[-1] - adv[0] + 1 != len(adv):
        raise UnsupportedModelError("fwdllm: __setitem__ with separated advanced indices on a tensor with tangents")
    sub = tt[(slice(None),) + idx]
    if t is None:
        tt[(slice(None),) + idx] = 0
    else:
        tt[(slice(None),) + idx] = dense_like(t, sub.shape[1:], tt.shape[0]).to(tt.dtype)
    STATS.add("rule", "setitem")
    return None


@register(T.zero_)
def zero_(func, args, kwargs):
    target = args[0]
    with torch._C.DisableTorchFunctionSubclass():
        P(target).zero_()
    if type(target) is Dual:
        writable_tangent(target).zero_()
    return target


@register(T.fill_, T.masked_fill_)
def fill_like_(func, args, kwargs):
    target = args[0]
    if any(type(a) is Dual for a in args[1:]):
        return _inplace_binary(getattr(T, func.__name__[:-1]))(func, args, kwargs)
    with torch._C.DisableTorchFunctionSubclass():
        func(P(target), *[P(a) for a in args[1:]], **kwargs)
    if type(target) is Dual:
        t = writable_tangent(target)
        if func is T.fill_:
            t.zero_()
        else:
            t.masked_fill_(P(args[1]), 0)
    return target


@register(T.add_, T.sub_, T.mul_, T.div_)
def arith_(func, args, kwargs):
    return _inplace_binary(getattr(T, func.__name__[:-1]))(func, args, kwargs)


@register(T.requires_grad_)
def requires_grad_(func, args, kwargs):
    return args[0]


# ---------------------------------------------------------------------------------------------
# custom autograd Functions


class _Ctx:
    """A stand-in autograd context for running a Function's forward in a dual pass."""

    def __init__(self):
        self.saved_tensors = ()
        self.needs_input_grad = ()
        self.materialize_grads = True

    def save_for_backward(self, *ts):
        self.saved_tensors = ts

    def save_for_forward(self, *ts):
        self.saved_for_forward = ts

    def mark_dirty(self, *ts):
        pass

    def mark_non_differentiable(self, *ts):
        pass

    def set_materialize_grads(self, value):
        self.materialize_grads = value


def function_apply(cls, *args, **kwargs):
    """``torch.autograd.Function.apply`` inside a dual session, for Functions given Duals: the Function's
    own ``jvp`` when it has one (stream by stream), else its forward run on the Duals, differentiated op
    by op; a forward that drops a tangent (detach, numpy, item) is refused, naming the Function."""
    from .core import DROPS
    if not any(type(a) is Dual for a in args):
        return _ORIG_APPLY.__func__(cls, *args, **kwargs)
    name = getattr(cls, "__qualname__", cls.__name__)
    if getattr(cls, "jvp", None) is not None and cls.jvp is not torch.autograd.Function.jvp and \
            getattr(cls, "setup_context", None) is not torch.autograd.Function.setup_context:
        return _apply_with_jvp(cls, args, kwargs)
    before = DROPS.n
    with torch.no_grad():
        out = cls.forward(_Ctx(), *args, **kwargs)
    if DROPS.n != before:
        raise UnsupportedModelError(
            f"fwdllm: the forward of autograd.Function {name} takes a tensor with tangents out of torch "
            "(detach / numpy / item), so its derivative cannot be traced: give it a jvp staticmethod "
            "(with setup_context)")
    return out


def _apply_with_jvp(cls, args, kwargs):
    prim = [P(a) for a in args]
    ctx = _Ctx()
    out = cls.forward(*prim, **kwargs)
    cls.setup_context(ctx, tuple(prim), out)
    K = next(tangent_K(a) for a in args if type(a) is Dual)
    streams = []
    for k in range(K):
        tk = [tan(a)[k] if type(a) is Dual else (torch.zeros_like(a) if isinstance(a, torch.Tensor) else None)
              for a in args]
        streams.append(cls.jvp(ctx, *tk))
    STATS.add("rule", "autograd_function_jvp")
    if isinstance(out, tuple):
        return tuple(make_dual(o, torch.stack([s[i] for s in streams])) for i, o in enumerate(out))
    return make_dual(out, torch.stack(streams))


_ORIG_APPLY = torch.autograd.Function.__dict__["apply"]
