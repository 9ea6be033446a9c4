"""The tangent-carrying tensor and the rule dispatch of the dual engine.

A :class:`Dual` *is* its primal tensor (a ``torch.Tensor`` subclass sharing the primal's storage, so
shape, dtype, device and data are the primal's and any code can read them) with K tangent streams
beside it. Every torch function or tensor method called on a Dual reaches
:meth:`Dual.__torch_function__` (at the Python level, before decomposition: ``F.linear``,
``F.layer_norm``, ``F.scaled_dot_product_attention``, ``Tensor.view`` ...), which computes the primal
on the plain tensors and the tangent by a rule:

- a registered rule for the op (``fwdllm.engine.rules``: shape ops, elementwise, reductions, the fused
  kernels of fwdkernels), or
- the generic rule: ``torch.func.vmap`` over the K streams of ``torch.func.jvp`` of that one op: always
  correct, slower; counted in :data:`STATS` so a run can say how much of it ran fused.

A value with no tangent is a plain tensor: code that touches no Dual runs as plain inference, with no
rule involved (the frozen prefix of a model below its first trainable parameter).

Tangents are stored as a dense (K, *primal.shape) tensor, or lazily as a :class:`Seeded` source (the
tangent of a trainable parameter: perturbation k regenerated from seeds[k] at the parameter's offset in
the flattened trainable vector), which the fused linear kernels consume without materialising it. A
dense tangent may be shared by several Duals (``a + plain`` reuses ``a``'s tangent); in-place rules
copy a shared tangent before writing (``_shared``).
"""
from __future__ import annotations

import collections
import sys
import threading
import weakref

import torch
from torch._C import DisableTorchFunctionSubclass
from torch.utils._pytree import tree_flatten, tree_unflatten

import fwdkernels as fk


class UnsupportedModelError(TypeError):
    """A model, module or op the dual engine cannot run; the message names it."""


# ---------------------------------------------------------------------------------------------
# statistics: how each op ran

class Stats:
    """Counts of op calls that carried tangents, by how they ran: ``fused`` (a fwdkernels kernel),
    ``rule`` (a closed-form rule in torch ops), ``generic`` (vmap of torch.func.jvp of the op)."""

    KINDS = ("fused", "rule", "generic")

    def __init__(self):
        self.counts = {k: collections.Counter() for k in self.KINDS}

    def add(self, kind, name):
        self.counts[kind][name] += 1

    def reset(self):
        for c in self.counts.values():
            c.clear()

    def totals(self) -> dict:
        return {k: sum(c.values()) for k, c in self.counts.items()}

    def fraction_fused(self) -> float:
        t = self.totals()
        n = sum(t.values())
        return t["fused"] / n if n else 1.0

    def summary(self) -> dict:
        """{kind: {op name: calls}} (a copy)."""
        return {k: dict(c) for k, c in self.counts.items()}

    def __repr__(self):
        t = self.totals()
        gen = ", ".join(f"{n} x{c}" for n, c in self.counts["generic"].most_common(8))
        return f"Stats(fused={t['fused']}, rule={t['rule']}, generic={t['generic']}{' [' + gen + ']' if gen else ''})"


STATS = Stats()
_TLS = threading.local()


def _name(func) -> str:
    n = getattr(func, "__name__", None) or repr(func)
    if n == "__get__":
        n = getattr(getattr(func, "__self__", None), "__name__", n)
    return n


# ---------------------------------------------------------------------------------------------
# tangent sources

class Seeded:
    """The tangent of a trainable parameter: stream k is ``perturb(seeds[k], numel, offset, dist)``
    reshaped to the parameter's shape (row-major), never stored unless a rule asks for it dense.

    Attributes: seeds (K,) int64 CPU tensor, offset (int), dist (str)."""

    __slots__ = ("seeds", "offset", "dist", "_dense")

    def __init__(self, seeds: torch.Tensor, offset: int, dist: str):
        self.seeds = seeds
        self.offset = int(offset)
        self.dist = dist
        self._dense = None

    @property
    def K(self) -> int:
        return int(self.seeds.shape[0])

    def dense(self, like: torch.Tensor) -> torch.Tensor:
        """(K, *like.shape) in like's dtype and device (materialised once, then cached)."""
        if self._dense is None:
            n = like.numel()
            v = torch.stack([fk.perturb(s, n, self.offset, self.dist, device=like.device)
                             for s in self.seeds.tolist()])
            self._dense = v.to(like.dtype).view(self.K, *like.shape)
        return self._dense


class Lazy:
    """A tangent computed on demand: whole (``full()``), or restricted to the indices ``idx`` of one primal
    dim (``get(dim, idx)``: (K, *shape) with dim cut to len(idx)), for a consumer that reads only some
    rows (a classification head reading the [CLS] position or the last token, a loss taking chunks of
    positions). ``fn(dim, idx)`` computes it (dim None: whole); ``rowwise``: the dims along which the op
    is row-wise (a restriction there restricts its inputs; elsewhere the whole tangent is sliced).

    The whole tangent is kept once computed (and the inputs released); the last row request is kept
    too, so a node read twice with the same rows (a residual stream) computes them once. Lazy tangents
    exist only where the session enables them (``lazy_scope``: the top block of a model and its head);
    everywhere else rules compute tangents at once."""

    __slots__ = ("K", "shape", "dtype", "fn", "rowwise", "merge", "act", "_full", "_last", "__weakref__")

    def __init__(self, K, shape, dtype, fn, rowwise, merge=None, act=None):
        self.K, self.shape, self.dtype, self.fn = int(K), tuple(shape), dtype, fn
        self.rowwise = frozenset(rowwise)
        self.merge = merge      # (source Dual, its shape) when this is a reshape merging dims 0 and 1
        self.act = act          # (name, [input Dual]) for a deferred activation (fused with its consumer)
        self._full = None
        self._last = None
        _LIVE.add(self)

    def full(self) -> torch.Tensor:
        if self._full is None:
            self._full = self.fn(None, None)
            self.fn = self.merge = self._last = self.act = None
        return self._full

    def get(self, dim, idx) -> torch.Tensor:
        if dim is None:
            return self.full()
        if self._full is not None or dim not in self.rowwise:
            return self.full().index_select(dim + 1, idx)
        last = self._last
        if last is not None and last[0] == dim and last[1] is idx:
            return last[2]
        t = self.fn(dim, idx)
        self._last = (dim, idx, t)
        return t


_LIVE = weakref.WeakSet()   # the Lazy tangents not yet garbage (flushed before in-place ops)


def _storage_uses(t: torch.Tensor) -> int:
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except Exception:  # not available: never claim exclusivity
        return 1 << 30


_REFCOUNTS_EXACT = sys.implementation.name == "cpython" and getattr(sys, "_is_gil_enabled", lambda: True)()


def take_sole(cell: list):
    """(Dual, exclusive) from a one-element cell holding the only engine reference to a Dual:
    ``exclusive`` when nothing else references it (the model's code has dropped it) and its dense
    tangent shares its storage with no other tensor, so a consumer may overwrite that tangent in place
    (CPython reference counts are exact)."""
    d = cell.pop()
    excl = (_REFCOUNTS_EXACT and sys.getrefcount(d) == 2 and type(d._tan) is torch.Tensor and not d._shared
            and _sole_tensor(d._tan))
    return d, excl


def _sole_tensor(t: torch.Tensor) -> bool:
    """No other tensor shares t's storage (a view's base counts only if nothing references it: the
    kernels' (K, M, d) outputs reach the rules as (K, B, L, d) views of a dropped base)."""
    n = 2  # t's own reference and the temporary storage object
    b = t._base
    if b is not None:
        if sys.getrefcount(b) > 2:
            return False
        n += 1
    del b
    return _storage_uses(t) == n


class _LazyMode(threading.local):
    on = False


LAZY = _LazyMode()


def flush_lazy():
    """Compute every pending lazy tangent whole (before an in-place op could change a saved primal)."""
    for z in list(_LIVE):
        if z.fn is not None:
            z.full()


# ---------------------------------------------------------------------------------------------
# the Dual tensor

class Dual(torch.Tensor):
    """A primal tensor with K tangent streams (see the module docstring). Build with :func:`make_dual`.

    Attributes:
        _plain: the primal as a plain tensor (same storage).
        _tan: (K, *shape) tensor or a :class:`Seeded` source.
        _shared: the dense tangent may be referenced by another Dual (copy before writing in place).
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return dispatch(func, args, kwargs or {})

    def __repr__(self):
        with DisableTorchFunctionSubclass():
            p = torch.Tensor.__repr__(self._plain)
        return f"Dual(K={tangent_K(self)}, primal={p})"

    @property
    def tangent(self) -> torch.Tensor:
        """The (K, *shape) tangent, dense."""
        return tan(self)


def make_dual(primal: torch.Tensor, tangent) -> Dual:
    """A Dual over ``primal`` (a plain tensor; a Dual's primal is taken) with tangent ``tangent``
    ((K, *primal.shape) tensor or a :class:`Seeded`)."""
    if type(primal) is Dual:
        primal = primal._plain
    if primal.requires_grad:
        primal = primal.detach()
    d = primal.as_subclass(Dual)
    d._plain = primal
    d._tan = tangent
    d._shared = False
    return d


def is_dual(x) -> bool:
    return type(x) is Dual


def P(x):
    """The plain primal of a Dual, anything else unchanged."""
    return x._plain if type(x) is Dual else x


def tan(x):
    """The dense (K, *x.shape) tangent of a Dual, or None for anything else."""
    if type(x) is not Dual:
        return None
    t = x._tan
    if type(t) is Seeded:
        return t.dense(x._plain)
    if type(t) is Lazy:
        x._tan = t = t.full()
        x._shared = True  # the node keeps it too
    return t


def tangent_K(x) -> int:
    t = x._tan
    return t.K if type(t) in (Seeded, Lazy) else int(t.shape[0])


def rows_of(x, dim, idx, ndim):
    """x's tangent under an output row request (dim, idx) of an op with ``ndim``-dim output, x aligned
    to the right as in broadcasting: restricted where x has that dim, whole where it is absent or 1.
    None if x carries no tangent; dim None: the whole tangent."""
    if type(x) is not Dual:
        return None
    if dim is None:
        return tan(x)
    xd = dim - (ndim - x._plain.dim())
    if xd < 0 or x._plain.shape[xd] == 1:
        return tan(x)
    t = x._tan
    if type(t) is Lazy:
        return t.get(xd, idx)
    return tan(x).index_select(xd + 1, idx)


def prim_rows(x, dim, idx, ndim):
    """The primal (a Dual's, or a plain tensor; scalars unchanged) under the same row request."""
    x = P(x)
    if dim is None or not isinstance(x, torch.Tensor):
        return x
    xd = dim - (ndim - x.dim())
    if xd < 0 or x.shape[xd] == 1:
        return x
    return x.index_select(xd, idx)


def lazy_out(out, K, fn, rowwise, merge=None):
    """The Dual output of a row-wise rule: its tangent deferred (a Lazy) in lazy mode, else fn(None, None)
    now. fn(dim, idx) computes the tangent, restricted or whole."""
    if LAZY.on:
        return make_dual(out, Lazy(K, out.shape, out.dtype, fn, rowwise, merge))
    return make_dual(out, fn(None, None))


def is_lazy(x) -> bool:
    return type(x) is Dual and type(x._tan) is Lazy


def unwrap_tree(obj):
    """Replace every Dual in a (nested list / tuple / dict) structure by its primal."""
    if type(obj) is Dual:
        return obj._plain
    if isinstance(obj, (list, tuple)):
        if not any(type(o) is Dual or isinstance(o, (list, tuple, dict)) for o in obj):
            return obj
        out = [unwrap_tree(o) for o in obj]
        return type(obj)(out) if type(obj) in (list, tuple) else type(obj)(*out)
    if isinstance(obj, dict):
        return {k: unwrap_tree(v) for k, v in obj.items()}
    return obj


def lift(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a tangent (K, *s) as (K, 1, ..., 1, *s) with ``ndim`` primal dims, so that it broadcasts
    against (K, *out.shape) for a primal that broadcast against out."""
    n = ndim - (t.dim() - 1)
    if n <= 0:
        return t
    return t.view(t.shape[0], *([1] * n), *t.shape[1:])


def dense_like(t: torch.Tensor, shape, K: int) -> torch.Tensor:
    """A tangent broadcast to (K, *shape), materialised (contiguous)."""
    t = lift(t, len(shape))
    if tuple(t.shape[1:]) == tuple(shape):
        return t
    return t.expand(K, *shape).contiguous()


# ---------------------------------------------------------------------------------------------
# dispatch

_META = set()       # functions whose result carries no tangent and reads no data through the rules
RULES = {}          # func -> rule(func, args, kwargs)


def register(*funcs):
    """Decorator: the rule for these torch functions / tensor methods (a rule computes the primal on
    plain tensors and wraps outputs that carry tangents with make_dual)."""
    def deco(rule):
        for f in funcs:
            if f is not None:
                RULES[f] = rule
        return rule
    return deco


class _Drops(threading.local):
    n = 0


DROPS = _Drops()  # how often a Dual's value left torch without its tangent (detach, numpy, item, ...)
_LEAVES = set()


def dispatch(func, args, kwargs):
    if func in _META:
        if func in _LEAVES:
            DROPS.n += 1
        with DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    rule = RULES.get(func)
    if rule is None:
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name[:-1]):
            return generic_inplace(func, args, kwargs)
        return generic(func, args, kwargs)
    return rule(func, args, kwargs)


def plain_call(func, args, kwargs):
    """func on the primals, with no rule (a result without tangent)."""
    with DisableTorchFunctionSubclass():
        return func(*unwrap_tree(args), **unwrap_tree(kwargs))


def _jvp_fn(func, flat, spec, idx):
    def call(*ps):
        fl = list(flat)
        for i, p in zip(idx, ps):
            fl[i] = p
        a, kw = tree_unflatten(fl, spec)
        return func(*a, **kw)
    return call


def _is_diff(o) -> bool:
    return isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex())


def generic(func, args, kwargs):
    """The rule of last resort: vmap over K of torch.func.jvp of the single op (exact)."""
    flat, spec = tree_flatten((args, kwargs))
    idx = [i for i, a in enumerate(flat) if type(a) is Dual]
    plain = [P(a) for a in flat]
    call = _jvp_fn(func, plain, spec, idx)
    with DisableTorchFunctionSubclass():
        out = call(*[plain[i] for i in idx])
    if not idx:
        return out
    oflat, ospec = tree_flatten(out)
    pos = [j for j, o in enumerate(oflat) if _is_diff(o)]
    if not pos:
        return out
    prim = tuple(plain[i] for i in idx)
    tans = []
    for i in idx:
        t = tan(flat[i])
        if t.dtype != plain[i].dtype:
            t = t.to(plain[i].dtype)
        tans.append(t)

    def float_out(*ps):
        o = tree_flatten(call(*ps))[0]
        return tuple(o[j] for j in pos)

    try:
        with DisableTorchFunctionSubclass():
            jv = torch.func.vmap(lambda *ts: torch.func.jvp(float_out, prim, ts)[1])(*tans)
    except Exception as e:  # no forward-mode formula, or not vmappable
        raise UnsupportedModelError(
            f"fwdllm: the dual engine has no rule for torch op {_name(func)!r} and torch.func.jvp cannot "
            f"differentiate it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    STATS.add("generic", _name(func))
    for j, t in zip(pos, jv):
        oflat[j] = make_dual(oflat[j], t)
    return tree_unflatten(oflat, ospec)


def promote(x: torch.Tensor, K: int, dtype=None) -> Dual:
    """Turn the plain tensor ``x`` itself (the same Python object) into a Dual with zero tangents:
    an in-place op is writing a tangent into it."""
    if type(x) is Dual:
        return x
    if isinstance(x, torch.nn.Parameter):
        raise UnsupportedModelError("fwdllm: an in-place op writes a tangent into a frozen parameter")
    if x._base is not None:
        raise UnsupportedModelError(
            f"fwdllm: an in-place op writes a tangent into a view (shape {tuple(x.shape)}) of a tensor that "
            "carries none; the dual engine cannot reach the view's base")
    with DisableTorchFunctionSubclass():
        alias = x.view_as(x)
    x.__class__ = Dual
    x._plain = alias
    x._tan = torch.zeros((K, *alias.shape), dtype=dtype or alias.dtype, device=alias.device)
    x._shared = False
    return x


def writable_tangent(x: Dual) -> torch.Tensor:
    """x's dense tangent, ready to be written in place (copied first if shared or seeded)."""
    t = x._tan
    if type(t) is Lazy:
        t = tan(x)
    if type(t) is Seeded:
        x._tan = t = t.dense(x._plain).clone()
    elif x._shared:
        x._tan = t = t.clone()
        x._shared = False
    return t


def any_K(flat) -> int | None:
    for a in flat:
        if type(a) is Dual:
            return tangent_K(a)
    return None


def generic_inplace(func, args, kwargs):
    """An in-place op without its own rule: the out-of-place op's rule, written back into the target
    (its primal and its tangent)."""
    target = args[0]
    if LAZY.on:
        flush_lazy()
    outplace = getattr(torch.Tensor, _name(func)[:-1])
    res = dispatch(outplace, args, kwargs)
    with DisableTorchFunctionSubclass():
        P(target).copy_(P(res))
    t = tan(res)
    if t is not None:
        if type(target) is not Dual:
            promote(target, int(t.shape[0]))
        writable_tangent(target).copy_(dense_like(t, target.shape, int(t.shape[0])))
    elif type(target) is Dual:
        writable_tangent(target).zero_()
    return target


def wrap_out(out, t, shared_with=None):
    """make_dual(out, t), marking a tangent shared with an input as such."""
    d = make_dual(out, t)
    if shared_with is not None:
        d._shared = True
        shared_with._shared = True
    return d


def meta(*funcs):
    for f in funcs:
        if f is not None:
            _META.add(f)


def _getter(name):
    a = getattr(torch.Tensor, name, None)
    return getattr(a, "__get__", None) if a is not None else None


# Metadata queries and ops whose outputs carry no tangent (integer / boolean results).
meta(*(_getter(n) for n in ("shape", "dtype", "device", "ndim", "is_cuda", "is_cpu", "requires_grad", "layout",
                            "is_sparse", "is_quantized", "is_meta", "names", "itemsize", "nbytes", "grad_fn",
                            "is_leaf", "_version", "is_nested", "is_mkldnn", "grad", "_base", "is_xpu", "is_mps")))
meta(*(getattr(torch.Tensor, n, None) for n in (
    "size", "dim", "numel", "stride", "data_ptr", "is_contiguous", "element_size", "is_floating_point",
    "is_complex", "storage_offset", "__len__", "nelement", "ndimension", "get_device", "is_set_to", "untyped_storage",
    "__bool__", "__int__", "__float__", "item", "tolist", "__index__", "__format__", "__hash__", "__eq__", "__ne__",
    "__lt__", "__le__", "__gt__", "__ge__", "eq", "ne", "lt", "le", "gt", "ge", "isnan", "isinf", "isfinite",
    "isneginf", "isposinf", "argmax", "argmin", "argsort", "nonzero", "any", "all", "bool", "long", "int", "short",
    "byte", "char", "sign", "signbit", "logical_not", "logical_and", "logical_or", "logical_xor", "is_nonzero",
    "equal", "allclose", "isclose", "count_nonzero", "__reduce_ex__", "__deepcopy__", "_is_view", "is_pinned",
    "is_shared", "is_inference", "__array__", "numpy", "__contains__", "bincount", "histc", "unique",
    "unique_consecutive", "searchsorted", "bucketize", "floor_divide", "__floordiv__", "__rfloordiv__",
    "__and__", "__or__", "__xor__", "__invert__", "bitwise_and", "bitwise_or", "bitwise_not", "remainder", "fmod",
    "__mod__", "__rmod__", "new_empty", "new_zeros", "new_ones", "new_full", "new_tensor", "register_hook",
    "backward", "requires_grad_", "retain_grad", "__dir__", "__sizeof__", "_typed_storage", "storage")))
meta(*(getattr(torch, n, None) for n in (
    "eq", "ne", "lt", "le", "gt", "ge", "isnan", "isinf", "isfinite", "argmax", "argmin", "argsort", "nonzero",
    "any", "all", "sign", "logical_not", "logical_and", "logical_or", "equal", "allclose", "isclose",
    "count_nonzero", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "randint_like", "numel", "is_tensor", "is_floating_point", "is_complex", "is_nonzero", "bucketize",
    "searchsorted", "unique", "bincount", "floor_divide", "remainder", "fmod", "result_type", "can_cast",
    "promote_types", "is_same_size", "bitwise_and", "bitwise_or", "bitwise_not", "broadcast_shapes")))

_LEAVES.update(f for f in (getattr(torch.Tensor, n, None) for n in (
    "numpy", "__array__", "tolist", "item", "__float__", "__int__", "__index__")) if f is not None)
