"""Tests of fwdkernels.attention_dual (fwdkernels/attention_dual.py, csrc/core/attention_dual.cpp).

The ground truth is torch.func.jvp, in float64, of a plain eager attention written here
(softmax(scale q k^T + mask) v, grouped-query attention through repeat_interleave, the causal mask
built from index comparisons), one jvp per tangent stream. Rows whose every key is masked are defined
to give o = 0 and o_dot = 0: the eager function zeroes their scores before the softmax (so that nothing
is NaN) and selects 0 for their output with torch.where.
"""
from __future__ import annotations

import functools
import math
import os
import zlib
from dataclasses import dataclass, replace

import pytest
import torch
from torch.func import jvp
from torch.utils._python_dispatch import TorchDispatchMode

import fwdkernels as fk
from fwdkernels.attention_dual import attention_dual_op

# torch's forward-AD decompositions (loaded on the first jvp) still go through torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


from kernel_helpers import (BACKEND_DTYPES, BF16, F32, F64, HAS_CPP, HAS_TRITON, TOL,  # noqa: E402,F401
                            TRITON_INTERPRETED, backend_available, needs_cpp, needs_triton)


# ---------------------------------------------------------------------------------------------
# problem construction


@dataclass(frozen=True)
class Case:
    B: int
    H: int
    Hkv: int
    L: int
    S: int
    D: int
    K: int
    tangents: str = "qkv"  # which of q_dot, k_dot, v_dot are given ("" = none: o_dot is None)
    mask: str = ""  # "" | pad_bool | pad_add | pad_min | rows_bool | full_add | head_add
    causal: bool = False
    scale: float | None = None
    bf16: bool = False  # inputs rounded to bfloat16


def _gen(case: Case) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(replace(case, bf16=False)).encode()))


@dataclass
class Problem:
    """Inputs in float64 (values exactly representable in the case's working dtype)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_dot: torch.Tensor | None
    k_dot: torch.Tensor | None
    v_dot: torch.Tensor | None
    mask: torch.Tensor | None  # bool or float64, as passed to the op (cast to the working dtype if float)
    keep: torch.Tensor  # (B, H, L, S) bool: key attended (mask and causal), for the eager reference
    add: torch.Tensor  # (B, H, L, S) float64 additive part of the mask (0 where no additive mask)
    scale: float


def _make_mask(case: Case, g):
    B, H, L, S = case.B, case.H, case.L, case.S
    kind = case.mask
    if not kind:
        return None
    if kind in ("pad_bool", "pad_add", "pad_min"):
        # (B, 1, 1, S) padding: batch b keeps its first S - b * (S // 3) keys (at least one)
        keep = torch.ones(B, 1, 1, S, dtype=torch.bool)
        for b in range(B):
            keep[b, ..., max(1, S - b * max(1, S // 3)):] = False
        if kind == "pad_bool":
            return keep
        fill = float("-inf") if kind == "pad_add" else torch.finfo(F32).min
        return torch.zeros(B, 1, 1, S, dtype=F64).masked_fill(~keep, fill)
    if kind == "rows_bool":
        # (B, 1, L, S): random keys dropped; every third query row of batch 0 has all keys masked
        keep = torch.rand(B, 1, L, S, generator=g) > 0.3
        keep[..., 0] = True
        keep[0, 0, ::3, :] = False
        if L == 1 and B == 1:  # keep something unmasked
            keep[0, 0, 0, 0] = True
        return keep
    if kind == "full_add":  # (1, 1, L, S) additive, finite (an ALiBi-like bias)
        return (torch.randn(1, 1, L, S, generator=g, dtype=F32) * 2).double()
    if kind == "head_add":  # (1, H, 1, S) additive with some -inf keys
        m = (torch.randn(1, H, 1, S, generator=g, dtype=F32)).double()
        m[0, ::2, 0, S // 2:] = float("-inf")
        return m
    raise ValueError(kind)


@functools.lru_cache(maxsize=None)
def make_problem(case: Case) -> Problem:
    g = _gen(case)
    B, H, Hkv, L, S, D, K = case.B, case.H, case.Hkv, case.L, case.S, case.D, case.K
    rnd = (lambda t: t.to(BF16).double()) if case.bf16 else (lambda t: t.double())

    def randn(*shape, s=1.0):
        return rnd(torch.randn(*shape, generator=g, dtype=F32) * s)

    q, k, v = randn(B, H, L, D), randn(B, Hkv, S, D), randn(B, Hkv, S, D)
    q_dot = randn(K, B, H, L, D) if "q" in case.tangents else None
    k_dot = randn(K, B, Hkv, S, D) if "k" in case.tangents else None
    v_dot = randn(K, B, Hkv, S, D) if "v" in case.tangents else None
    mask = _make_mask(case, g)
    keep = torch.ones(B, H, L, S, dtype=torch.bool)
    add = torch.zeros(B, H, L, S, dtype=F64)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = keep & mask
        else:
            keep = keep & torch.isfinite(mask)
            add = add + torch.where(torch.isfinite(mask), mask, torch.zeros((), dtype=F64))
    if case.causal:
        i = torch.arange(L)[:, None]
        j = torch.arange(S)[None, :]
        keep = keep & (j <= i + (S - L))
    scale = case.scale if case.scale is not None else 1.0 / math.sqrt(D)
    return Problem(q, k, v, q_dot, k_dot, v_dot, mask, keep, add, scale)


def eager_attention(q, k, v, keep, add, scale):
    """softmax(scale q k^T + add, masked by keep) v in plain torch; all-masked rows give 0."""
    G = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    s = scale * (q @ k.transpose(-1, -2)) + add
    s = s.masked_fill(~keep, float("-inf"))
    empty = ~keep.any(dim=-1, keepdim=True)  # (B, H, L, 1)
    s = torch.where(empty, torch.zeros((), dtype=s.dtype), s)
    o = torch.softmax(s, dim=-1) @ v
    return torch.where(empty, torch.zeros((), dtype=o.dtype), o)


@functools.lru_cache(maxsize=None)
def jvp_truth(case: Case):
    """(o, o_dot) in float64: o_dot[k] = jvp of eager_attention along tangent stream k (None if none)."""
    p = make_problem(case)
    f = lambda q, k, v: eager_attention(q, k, v, p.keep, p.add, p.scale)  # noqa: E731
    with torch.no_grad():
        o = f(p.q, p.k, p.v)
    if not case.tangents:
        return o, None
    z = lambda t, ref, kk: t[kk] if t is not None else torch.zeros_like(ref)  # noqa: E731
    outs = []
    for kk in range(case.K):
        tang = (z(p.q_dot, p.q, kk), z(p.k_dot, p.k, kk), z(p.v_dot, p.v, kk))
        o2, od = jvp(f, (p.q, p.k, p.v), tang)
        outs.append(od)
    torch.testing.assert_close(o2, o, rtol=0, atol=0)
    return o, torch.stack(outs)


def call(p: Problem, case: Case, dtype, backend, **override):
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    mask = p.mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    kw = dict(q=c(p.q), k=c(p.k), v=c(p.v), q_dot=c(p.q_dot), k_dot=c(p.k_dot), v_dot=c(p.v_dot), attn_mask=mask,
              causal=case.causal, scale=case.scale, backend=backend)
    kw.update(override)
    return fk.attention_dual(**kw)


def check(out, ref, dtype, what=""):
    rel_tol, max_tol = TOL[dtype]
    assert out.dtype == dtype, what
    assert tuple(out.shape) == tuple(ref.shape), f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o = out.double()
    assert torch.isfinite(o).all(), f"{what}: non-finite values"
    err = o - ref
    nref = ref.norm().item()
    if nref == 0:
        assert err.abs().max().item() == 0, f"{what}: expected exact zeros"
        return
    rel = err.norm().item() / nref
    assert rel < rel_tol, f"{what}: relative error {rel:.3e} >= {rel_tol:.1e}"
    mx = err.abs().max().item()
    assert mx <= max_tol * ref.abs().max().item(), f"{what}: max abs error {mx:.3e} vs scale {ref.abs().max():.3e}"


def check_case(case: Case, backend: str, dtype, **override):
    p = make_problem(case)
    o_ref, od_ref = jvp_truth(case)
    o, od = call(p, case, dtype, backend, **override)
    check(o, o_ref, dtype, f"{backend} o")
    if od_ref is None:
        assert od is None, "o_dot must be None when no tangent flows"
    else:
        check(od, od_ref, dtype, f"{backend} o_dot")
    return o, od


# ---------------------------------------------------------------------------------------------
# the main grids

SHAPES = [  # (B, H, Hkv, L, S, D, K)
    (1, 1, 1, 1, 1, 8, 1),
    (2, 3, 3, 5, 5, 16, 3),
    (2, 4, 1, 5, 9, 24, 3),     # GQA (Hkv = 1), S > L
    (1, 4, 2, 33, 33, 64, 8),   # GQA (Hkv = 2), L crosses the 32-row query block
    (2, 3, 1, 33, 70, 8, 1),    # S crosses the 64-key block
    (1, 3, 3, 1, 33, 16, 8),    # one query row (decoding)
]
_sid = lambda s: "x".join(map(str, s))  # noqa: E731


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("tangents", ["qkv", "q", "k", "v", "qk", ""], ids=lambda t: t or "none")
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
def test_matches_jvp(shape, tangents, backend, dtype):
    check_case(Case(*shape, tangents=tangents), backend, dtype)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask", ["", "pad_bool", "pad_add", "pad_min", "rows_bool", "full_add", "head_add"],
                         ids=lambda m: m or "nomask")
@pytest.mark.parametrize("shape", SHAPES[1:], ids=_sid)
def test_masks_and_causal(shape, mask, causal, backend, dtype):
    check_case(Case(*shape, mask=mask, causal=causal), backend, dtype)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape", [(2, 4, 2, 9, 4, 16, 2), (1, 3, 1, 40, 7, 8, 3)], ids=_sid)
def test_causal_with_fewer_keys_than_queries(shape, backend, dtype):
    """S < L: the first L - S query rows see no key under the bottom-right causal mask: o = o_dot = 0."""
    case = Case(*shape, causal=True, mask="pad_bool")
    o, od = check_case(case, backend, dtype)
    B, H, Hkv, L, S, D, K = shape
    assert torch.count_nonzero(o[:, :, :L - S]) == 0
    assert torch.count_nonzero(od[:, :, :, :L - S]) == 0


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_fully_masked_rows_are_zero(backend, dtype):
    case = Case(2, 3, 1, 7, 11, 16, 3, mask="rows_bool")
    o, od = check_case(case, backend, dtype)
    rows = torch.zeros(7, dtype=torch.bool)
    rows[::3] = True  # batch 0's every-third row is fully masked
    assert torch.count_nonzero(o[0, :, rows]) == 0 and torch.count_nonzero(od[:, 0, :, rows]) == 0
    assert torch.count_nonzero(o[0, :, ~rows]) > 0
    # a mask that masks everything: all zeros, no NaN
    p = make_problem(case)
    none = torch.zeros(1, 1, 1, 11, dtype=torch.bool)
    o, od = call(p, case, dtype, backend, attn_mask=none)
    assert torch.count_nonzero(o) == 0 and torch.count_nonzero(od) == 0


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_scale_and_large_head_dim(backend, dtype):
    check_case(Case(1, 2, 1, 9, 13, 256, 2, scale=0.37, mask="pad_add", causal=True), backend, dtype)
    check_case(Case(1, 2, 2, 5, 66, 128, 3, scale=0.1), backend, dtype)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES + [pytest.param("triton", F32, id="triton-f32",
                                                                          marks=needs_triton)])
def test_noncontiguous_inputs(backend, dtype):
    """q, k, v as (B, L, H, D).transpose(1, 2) views (the Hugging Face layout), a transposed mask."""
    case = Case(2, 4, 2, 6, 9, 16, 3, mask="rows_bool", causal=True)
    p = make_problem(case)
    o_ref, od_ref = jvp_truth(case)
    c = lambda t: t.to(dtype)  # noqa: E731
    tv = lambda t: c(t).transpose(-2, -3).contiguous().transpose(-2, -3)  # noqa: E731
    mask = p.mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    views = dict(q=tv(p.q), k=tv(p.k), v=tv(p.v), q_dot=tv(p.q_dot), k_dot=tv(p.k_dot), v_dot=tv(p.v_dot),
                 attn_mask=mask)
    for name, t in views.items():
        assert not t.is_contiguous(), name
    o, od = call(p, case, dtype, backend, **views)
    check(o, o_ref, dtype, "o")
    check(od, od_ref, dtype, "o_dot")


# ---------------------------------------------------------------------------------------------
# cpp specifics


@needs_cpp
def test_cpp_deterministic_and_thread_count_independent():
    case = Case(2, 4, 2, 70, 90, 24, 3, mask="pad_bool", causal=True)
    p = make_problem(case)
    nt = torch.get_num_threads()
    try:
        a = call(p, case, F32, "cpp")
        b = call(p, case, F32, "cpp")
        torch.set_num_threads(1)
        c = call(p, case, F32, "cpp")
    finally:
        torch.set_num_threads(nt)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v)
        assert torch.equal(u, w)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@needs_cpp
def test_cpp_single_fused_call(monkeypatch):
    """Automatic dispatch on float32 CPU tensors: one op, one extension call, no torch matmul/softmax."""
    case = Case(2, 4, 2, 9, 13, 16, 3, mask="pad_bool")
    p = make_problem(case)
    n = {"calls": 0}
    orig = fk._ext.C.attention_dual

    def wrapper(*a):
        n["calls"] += 1
        return orig(*a)

    monkeypatch.setattr(fk._ext.C, "attention_dual", wrapper)
    with _OpLog() as log:
        o, od = call(p, case, F32, None)
    assert n["calls"] == 1
    assert log.ops.count("fwdkernels.attention_dual") == 1
    heavy = [op for op in log.ops if op.startswith("aten.") and any(
        s in op for s in ("mm", "matmul", "einsum", "softmax", "exp", "repeat"))]
    assert not heavy, heavy
    o_ref, od_ref = jvp_truth(case)
    check(o, o_ref, F32)
    check(od, od_ref, F32)


# ---------------------------------------------------------------------------------------------
# bfloat16


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "reference"])
@pytest.mark.parametrize("case", [
    Case(2, 4, 1, 5, 9, 24, 3, bf16=True),
    Case(1, 4, 2, 33, 70, 64, 2, mask="rows_bool", causal=True, bf16=True),
    Case(2, 3, 3, 5, 5, 16, 3, tangents="v", mask="pad_add", bf16=True),
], ids=["gqa", "masked-causal", "v-only"])
def test_bfloat16(case, backend):
    check_case(case, backend, BF16)


@needs_triton
def test_bfloat16_triton():
    case = Case(2, 4, 1, 5, 9, 16, 3, bf16=True)
    if TRITON_INTERPRETED:
        # Triton's CPU interpreter computes tl.dot on bfloat16 operands wrongly: the backend refuses.
        with pytest.raises(RuntimeError, match="interpreter"):
            check_case(case, "triton", BF16)
        return
    check_case(case, "triton", BF16)


# ---------------------------------------------------------------------------------------------
# Triton (CPU interpreter: small shapes only)

TRITON_CASES = [
    Case(1, 1, 1, 1, 1, 8, 1),
    Case(2, 3, 3, 5, 5, 16, 3),
    Case(2, 4, 1, 5, 9, 24, 3, tangents="q"),
    Case(2, 4, 1, 5, 9, 24, 3, tangents="k", mask="pad_bool"),
    Case(2, 4, 2, 5, 9, 24, 2, tangents="v", mask="head_add", causal=True),
    Case(2, 4, 2, 5, 9, 24, 2, tangents=""),
    Case(1, 2, 1, 33, 40, 16, 8, mask="rows_bool", causal=True),
    Case(2, 2, 2, 7, 21, 64, 2, mask="pad_min"),
    Case(1, 2, 1, 20, 6, 8, 2, causal=True),  # S < L: fully masked rows and a program with no key block
    Case(1, 2, 1, 7, 11, 16, 2, mask="full_add", causal=True, scale=0.3),
]


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"{c.B}x{c.H}x{c.Hkv}x{c.L}x{c.S}x{c.D}x{c.K}-"
                         f"{c.tangents or 'none'}-{c.mask or 'nomask'}-{'causal' if c.causal else 'full'}")
def test_triton_matches_jvp(case):
    check_case(case, "triton", F32)


# ---------------------------------------------------------------------------------------------
# dispatch


def test_auto_dispatch_and_forcing(monkeypatch):
    case = Case(2, 4, 2, 5, 9, 16, 2)
    p = make_problem(case)
    expected = "cpp" if HAS_CPP else "reference"
    assert attention_dual_op.choose("cpu", None, q=p.q.float()) == expected
    assert attention_dual_op.choose("cpu", None, q=p.q.bfloat16()) == expected
    assert attention_dual_op.choose("cpu", None, q=p.q) == "reference"  # float64: cpp cannot, falls back
    check_case(case, None, F64)
    monkeypatch.setenv("FWDKERNELS_BACKEND", "reference")
    if HAS_CPP:
        def boom(*a):
            raise AssertionError("cpp called although FWDKERNELS_BACKEND=reference")
        monkeypatch.setattr(fk._ext.C, "attention_dual", boom)
    check_case(case, None, F32)
    monkeypatch.undo()
    if HAS_CPP:
        with pytest.raises(RuntimeError, match=r"(?s)backend='cpp' cannot serve.*float64"):
            call(p, case, F64, "cpp")
    with pytest.raises(RuntimeError, match="unknown backend 'nope'"):
        call(p, case, F32, "nope")
    with pytest.raises(RuntimeError, match="(?s)backend='cuda' cannot serve"):
        call(p, case, F32, "cuda")


@needs_triton
def test_triton_refuses_large_head_dim():
    case = Case(1, 1, 1, 2, 2, 264, 1)
    with pytest.raises(RuntimeError, match="D <= 256"):
        call(make_problem(case), case, F32, "triton")


# ---------------------------------------------------------------------------------------------
# opcheck


def _op_args(case: Case, dtype, backend):
    p = make_problem(case)
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    mask = p.mask if p.mask is None or p.mask.dtype == torch.bool else p.mask.to(dtype)
    K = case.K if case.tangents else 0
    return (c(p.q), c(p.k), c(p.v), c(p.q_dot), c(p.k_dot), c(p.v_dot), mask, case.causal, p.scale, K, backend)


OPCHECK_CASES = [
    Case(2, 4, 2, 5, 9, 16, 2, mask="pad_bool", causal=True),
    Case(1, 3, 1, 6, 6, 8, 3, tangents="v", mask="full_add"),
    Case(2, 2, 2, 5, 7, 8, 2, tangents=""),
]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES[:2])
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=["qkv-pad-causal", "v-additive", "primal-only"])
def test_opcheck(case, backend, dtype):
    op = torch.ops.fwdkernels.attention_dual.default
    args = _op_args(case, dtype, backend)
    torch.library.opcheck(op, args)
    o, od = op(*args)
    o_ref, od_ref = jvp_truth(case)
    check(o, o_ref, dtype)
    if od_ref is None:
        assert od.shape == (0, *o.shape)
    else:
        check(od, od_ref, dtype)


def test_backward_is_a_clear_error():
    case = Case(1, 2, 1, 3, 4, 8, 1)
    p = make_problem(case)
    q = p.q.float().requires_grad_(True)
    o, od = call(p, case, F32, None, q=q)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        (o.sum() + od.sum()).backward()


# ---------------------------------------------------------------------------------------------
# argument errors


def _good():
    p = make_problem(Case(2, 4, 2, 5, 9, 16, 3))
    c = lambda t: t.float()  # noqa: E731
    return dict(q=c(p.q), k=c(p.k), v=c(p.v), q_dot=c(p.q_dot), k_dot=c(p.k_dot), v_dot=c(p.v_dot))


def _bad(match, exc=ValueError, **changes):
    kw = _good()
    kw.update(changes)
    with pytest.raises(exc, match=match):
        fk.attention_dual(**kw)


def test_good_arguments_work():
    o, od = fk.attention_dual(**_good())
    assert o.shape == (2, 4, 5, 16) and od.shape == (3, 2, 4, 5, 16)
    o, od = fk.attention_dual(**{**_good(), "q_dot": None, "k_dot": None, "v_dot": None})
    assert od is None


def test_shape_errors():
    r = torch.randn
    _bad(r"q must be 4-D \(B, H, L, D\)", q=r(4, 5, 16))
    _bad(r"k must be 4-D \(B, Hkv, S, D\)", k=r(2, 2, 9, 16, 1))
    _bad(r"k must have shape \(B, Hkv, S, D\) with B=2, D=16", k=r(2, 2, 9, 8))
    _bad(r"k must have shape .* with B=2", k=r(3, 2, 9, 16))
    _bad(r"v must have k's shape \(2, 2, 9, 16\)", v=r(2, 2, 8, 16))
    _bad("H=4 must be a multiple of the kv heads Hkv=3", k=r(2, 3, 9, 16), v=r(2, 3, 9, 16), k_dot=None,
         v_dot=None)
    _bad("empty inputs", q=r(2, 4, 0, 16), q_dot=None)
    _bad(r"q_dot must have shape \(K, 2, 4, 5, 16\)", q_dot=r(3, 2, 4, 5, 15))
    _bad(r"q_dot must have shape", q_dot=r(2, 4, 5, 16))
    _bad(r"k_dot must have shape \(K, 2, 2, 9, 16\)", k_dot=r(3, 2, 4, 9, 16))
    _bad("k_dot has 2 tangent streams but the tangents before it have K=3", k_dot=r(2, 2, 2, 9, 16))
    _bad("v_dot has 4 tangent streams but the tangents before it have K=2", q_dot=None, k_dot=r(2, 2, 2, 9, 16),
         v_dot=r(4, 2, 2, 9, 16))
    _bad("K = 0", q_dot=r(0, 2, 4, 5, 16), k_dot=None, v_dot=None)


def test_mask_errors():
    r = torch.randn
    _bad(r"attn_mask of shape \(2, 4, 5, 8\) is not broadcastable to \(B, H, L, S\) = \(2, 4, 5, 9\)",
         attn_mask=r(2, 4, 5, 8))
    _bad("attn_mask of shape .* is not broadcastable", attn_mask=r(3, 1, 1, 9))
    _bad("attn_mask of shape .* is not broadcastable", attn_mask=r(1, 2, 4, 5, 9))
    _bad("attn_mask must be bool .* or an additive float mask, got torch.int64", TypeError,
         attn_mask=torch.ones(2, 1, 1, 9, dtype=torch.int64))
    _bad("attn_mask must be a tensor", TypeError, attn_mask=[[True] * 9])
    # broadcastable shapes of lower rank are fine
    for shape in [(9,), (5, 9), (1, 5, 9), (2, 1, 1, 9), (1, 4, 1, 1)]:
        fk.attention_dual(**_good(), attn_mask=torch.ones(shape, dtype=torch.bool))


def test_dtype_device_and_option_errors():
    g = _good()
    _bad("k has dtype torch.float64 but q has torch.float32", TypeError, k=g["k"].double())
    _bad("v_dot has dtype torch.bfloat16", TypeError, v_dot=g["v_dot"].bfloat16())
    _bad("q must be floating point", TypeError, q=torch.ones(2, 4, 5, 16, dtype=torch.int64), q_dot=None)
    _bad("q must be a tensor", TypeError, q=[[1.0]])
    _bad("q_dot must be a tensor or None", TypeError, q_dot=1.0)
    _bad("causal must be a bool", TypeError, causal=1)
    _bad("scale must be a number", TypeError, scale="0.5")
    _bad("scale must be finite", scale=float("nan"))
    _bad("k is on meta but q is on cpu", k=g["k"].to("meta"))


def test_forced_backend_errors():
    case = Case(1, 2, 1, 3, 4, 8, 1)
    p = make_problem(case)
    if HAS_CPP:
        with pytest.raises(RuntimeError, match=r"(?s)backend='cpp' cannot serve.*supports float32 and bfloat16"):
            call(p, case, F64, "cpp")


@needs_triton
def test_triton_without_interpreter_refuses_cpu(monkeypatch):
    case = Case(1, 2, 1, 3, 4, 8, 1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        call(make_problem(case), case, F32, "triton")


@needs_cpp
def test_cpp_binding_checks():
    """The extension function checks its own arguments (it is reachable without the Python wrapper)."""
    g = _good()
    C = fk._ext.C
    args = (g["q"], g["k"], g["v"], g["q_dot"], g["k_dot"], g["v_dot"], None, False, 0.25, 3)
    o, od = C.attention_dual(*args)
    assert od.shape == (3, 2, 4, 5, 16)
    bad = list(args)
    bad[3] = g["q_dot"][:2]
    with pytest.raises(RuntimeError, match="q_dot must be"):
        C.attention_dual(*bad)
    bad = list(args)
    bad[6] = torch.ones(2, 4, 5, 8, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="not broadcastable"):
        C.attention_dual(*bad)
    bad = list(args)
    bad[1] = g["k"].double()
    with pytest.raises(RuntimeError, match="dtype"):
        C.attention_dual(*bad)
    bad = list(args)
    bad[7:] = [False, float("inf"), 3]
    with pytest.raises(RuntimeError, match="fwd_attention_dual: scale must be finite"):  # named by the C API
        C.attention_dual(*bad)


@needs_cpp
def test_torch_compile_fullgraph():
    """The registered op traces under torch.compile (fake kernel) and gives the eager results."""
    case = Case(2, 4, 2, 5, 9, 16, 2, mask="pad_bool", causal=True)
    p = make_problem(case)
    q, k, v, qd = p.q.float(), p.k.float(), p.v.float(), p.q_dot.float()

    def f(q):
        o, od = fk.attention_dual(q, k, v, qd, None, None, attn_mask=p.mask, causal=True, backend="cpp")
        return o.square().sum(), od.sum(dim=(1, 2, 3, 4))

    eager = f(q)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q)
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(c, a)
