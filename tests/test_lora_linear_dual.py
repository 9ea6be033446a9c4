"""Tests of fwdkernels.lora_linear_dual (fwdkernels/lora_linear_dual.py, csrc/core/lora_dual.cpp).

The ground truth is torch.func.jvp, in float64, of a peft ``lora.Linear`` (or a plain ``nn.Linear``
for the frozen case) evaluated with torch.func.functional_call over (input, lora_A.weight,
lora_B.weight[, bias]) with tangents (x_dot[k], V_A[k], V_B[k][, V_b[k]]). The perturbation slices
V are materialised with fwdkernels.perturb(backend="reference") (itself checked against an independent
Philox in test_perturb.py) and cast to float64. The plain formula is checked against the jvp too.
"""
from __future__ import annotations

import functools
import math
import os
import random
import zlib
from dataclasses import dataclass, replace

import pytest
import torch
from torch.func import functional_call, jvp
from torch.utils._python_dispatch import TorchDispatchMode

import fwdkernels as fk
from fwdkernels.lora_linear_dual import lora_linear_dual_op

peft = pytest.importorskip("peft")
# torch's forward-AD decompositions (loaded on the first jvp) still go through torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
from peft import LoraConfig  # noqa: E402
from peft.tuners import lora as peft_lora  # noqa: E402


from kernel_helpers import (BACKEND_DTYPES, BF16, F32, F64, HAS_CPP, HAS_TRITON, TOL,  # noqa: E402,F401
                            TRITON_INTERPRETED, backend_available, needs_cpp, needs_triton)

# ---------------------------------------------------------------------------------------------
# problem construction


@dataclass(frozen=True)
class Case:
    M: int
    d_in: int
    d_out: int
    r: int  # 0: frozen linear (lora_A = lora_B = None)
    K: int
    xdot: bool = True
    bias: str = "frozen"  # "none" | "frozen" | "trainable" (BitFit, via offset_bias)
    dist: str = "rademacher"
    explicit: str = ""  # subset of "ABb": slices given as explicit tangents instead of seeds
    lead: tuple = ()  # leading batch shape replacing (M,), e.g. (2, 5); M must be its product
    offset_A: int = 1000
    offset_bias: int | None = None  # default: after lora_B
    bf16: bool = False  # inputs rounded to bfloat16

    @property
    def rows_shape(self):
        return self.lead if self.lead else (self.M,)


def _rng(case: Case) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


@dataclass
class Problem:
    """All inputs in float64 (values exactly representable in the case's working dtype)."""
    x: torch.Tensor
    x_dot: torch.Tensor | None
    W: torch.Tensor
    b: torch.Tensor | None
    A: torch.Tensor | None
    B: torch.Tensor | None
    alpha: float
    scaling: float
    seeds: torch.Tensor | None
    offset_A: int
    offset_B: int
    offset_bias: int | None
    dist: str
    A_dot: torch.Tensor | None
    B_dot: torch.Tensor | None
    bias_dot: torch.Tensor | None
    K: int


@functools.lru_cache(maxsize=None)
def make_problem(case: Case) -> Problem:
    g = _rng(case)
    rnd = random.Random(zlib.crc32(repr(case).encode()))
    rows = case.rows_shape
    assert math.prod(rows) == case.M
    K, d_in, d_out, r = case.K, case.d_in, case.d_out, case.r
    q = (lambda t: t.to(BF16).double()) if case.bf16 else (lambda t: t.double())

    def randn(*shape, scale=1.0):
        t = torch.randn(*shape, generator=g, dtype=F32) * scale
        return q(t)

    x = randn(*rows, d_in)
    x_dot = randn(K, *rows, d_in) if case.xdot else None
    W = randn(d_out, d_in, scale=1 / math.sqrt(d_in))
    b = randn(d_out) if case.bias != "none" else None
    A = randn(r, d_in, scale=1 / math.sqrt(d_in)) if r else None
    B = randn(d_out, r) if r else None  # non-zero (unlike peft's default init)
    alpha = float(2 * r + 1) if r else 1.0
    scaling = alpha / r if r else 1.0
    seeds = torch.tensor([rnd.getrandbits(64) - (1 << 63) for _ in range(K)], dtype=torch.int64)
    offset_A = case.offset_A
    offset_B = offset_A + r * d_in
    offset_bias = None
    if case.bias == "trainable":
        offset_bias = case.offset_bias if case.offset_bias is not None else offset_B + d_out * r
    A_dot = randn(K, r, d_in) if (r and "A" in case.explicit) else None
    B_dot = randn(K, d_out, r) if (r and "B" in case.explicit) else None
    bias_dot = randn(K, d_out) if (case.bias == "trainable" and "b" in case.explicit) else None
    need_seeds = (r and (A_dot is None or B_dot is None)) or (offset_bias is not None and bias_dot is None)
    if case.explicit and not need_seeds:
        seeds = None
    return Problem(x, x_dot, W, b, A, B, alpha, scaling, seeds, offset_A, offset_B, offset_bias, case.dist,
                   A_dot, B_dot, bias_dot, K)


@functools.lru_cache(maxsize=None)
def materialised(case: Case):
    return materialise(make_problem(case))


def materialise(p: Problem):
    """Float64 tangents of the trainable parameters: (V_A, V_B, V_b), each (K, ...) or None."""
    d_out, d_in = p.W.shape

    def slices(numel, offset, shape):
        return torch.stack([fk.perturb(int(s), numel, offset, p.dist, backend="reference").double()
                            for s in p.seeds]).reshape(p.K, *shape)

    VA = VB = Vb = None
    if p.A is not None:
        r = p.A.shape[0]
        VA = p.A_dot if p.A_dot is not None else slices(r * d_in, p.offset_A, (r, d_in))
        VB = p.B_dot if p.B_dot is not None else slices(d_out * r, p.offset_B, (d_out, r))
    if p.bias_dot is not None:
        Vb = p.bias_dot
    elif p.offset_bias is not None:
        Vb = slices(d_out, p.offset_bias, (d_out,))
    return VA, VB, Vb


def _module(p: Problem):
    d_out, d_in = p.W.shape
    base = torch.nn.Linear(d_in, d_out, bias=p.b is not None, dtype=F64)
    if p.A is None:
        return base, {"W": "weight", "b": "bias"}
    r = p.A.shape[0]
    cfg = LoraConfig(r=r, lora_alpha=p.alpha, lora_dropout=0.0, init_lora_weights=False)
    mod = peft_lora.Linear(base, adapter_name="default", config=cfg, r=r, lora_alpha=p.alpha).double()
    assert mod.scaling["default"] == pytest.approx(p.scaling, rel=1e-15)
    return mod, {"W": "base_layer.weight", "b": "base_layer.bias", "A": "lora_A.default.weight",
                 "B": "lora_B.default.weight"}


@functools.lru_cache(maxsize=None)
def jvp_truth(case: Case):
    """(y, y_dot) in float64 from torch.func.jvp of the peft module (vmapped over the K tangents)."""
    p = make_problem(case)
    VA, VB, Vb = materialised(case)
    mod, names = _module(p)
    values = {"W": p.W, "b": p.b, "A": p.A, "B": p.B}
    trainable = (["A", "B"] if p.A is not None else []) + (["b"] if Vb is not None else [])
    fixed = {names[k]: v for k, v in values.items() if v is not None and k not in trainable}

    def f(x, *params):
        return functional_call(mod, {**fixed, **{names[k]: t for k, t in zip(trainable, params)}}, (x,))

    tangent_of = {"A": VA, "B": VB, "b": Vb}
    primals = (p.x, *[values[n] for n in trainable])
    tangents = (p.x_dot if p.x_dot is not None else torch.zeros(p.K, *p.x.shape, dtype=F64),
                *[tangent_of[n] for n in trainable])
    with torch.no_grad():
        y = f(*primals)
    # one jvp per perturbation k, vectorised over k
    y_dot = torch.func.vmap(lambda *ts: jvp(f, primals, ts)[1])(*tangents)
    # the documented formula must agree with the jvp (checked once per case)
    y_f, yd_f = formula(p, (VA, VB, Vb))
    check(y_f, y, F64, "formula y vs jvp")
    check(yd_f, y_dot, F64, "formula y_dot vs jvp")
    return y, y_dot


def formula(p: Problem, slices=None):
    """The documented formula, in float64."""
    VA, VB, Vb = slices if slices is not None else materialise(p)
    x = p.x
    y = x @ p.W.T
    yd = (p.x_dot @ p.W.T) if p.x_dot is not None else torch.zeros(p.K, *y.shape, dtype=F64)
    if p.b is not None:
        y = y + p.b
    if p.A is not None:
        h = x @ p.A.T
        y = y + p.scaling * h @ p.B.T
        u = torch.einsum("...i,kri->k...r", x, VA)
        if p.x_dot is not None:
            u = u + p.x_dot @ p.A.T
        yd = yd + p.scaling * (u @ p.B.T + torch.einsum("...r,kor->k...o", h, VB))
    if Vb is not None:
        yd = yd + Vb.reshape(p.K, *([1] * (x.dim() - 1)), -1)
    return y, yd


def call(p: Problem, dtype, backend, **override):
    """lora_linear_dual on the problem's inputs cast to ``dtype``."""
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    kw = dict(x=c(p.x), x_dot=c(p.x_dot), weight=c(p.W), bias=c(p.b), lora_A=c(p.A), lora_B=c(p.B),
              scaling=p.scaling, seeds=p.seeds, offset_A=p.offset_A, offset_B=p.offset_B, dist=p.dist,
              backend=backend, offset_bias=p.offset_bias, A_dot=c(p.A_dot), B_dot=c(p.B_dot),
              bias_dot=c(p.bias_dot))
    kw.update(override)
    return fk.lora_linear_dual(**kw)


def check(out, ref, dtype, what=""):
    rel_tol, max_tol = TOL[dtype]
    assert out.dtype == dtype, what
    assert tuple(out.shape) == tuple(ref.shape), what
    o = out.double()
    assert torch.isfinite(o).all(), what
    err = o - ref
    nref = ref.norm().item()
    if nref == 0:
        assert err.abs().max().item() == 0, f"{what}: expected exact zeros"
        return
    rel = err.norm().item() / nref
    assert rel < rel_tol, f"{what}: relative error {rel:.3e} >= {rel_tol:.1e}"
    mx = err.abs().max().item()
    assert mx <= max_tol * ref.abs().max().item(), f"{what}: max abs error {mx:.3e} vs scale {ref.abs().max():.3e}"


def check_case(case: Case, backend: str, dtype):
    p = make_problem(case)
    y_ref, yd_ref = jvp_truth(case)  # also checks the plain formula against the jvp
    y, yd = call(p, dtype, backend)
    check(y, y_ref, dtype, f"{backend} y")
    check(yd, yd_ref, dtype, f"{backend} y_dot")
    return y, yd


# ---------------------------------------------------------------------------------------------
# the main grid: shapes x (x_dot, bias mode, dist) x backend/dtype

SHAPES = [  # (M, d_in, d_out, r, K)
    (1, 19, 23, 1, 1),
    (7, 45, 70, 3, 2),
    (33, 70, 45, 8, 5),
    (7, 23, 19, 3, 16),
    (33, 19, 70, 1, 16),
]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("dist", ["rademacher", "normal"])
@pytest.mark.parametrize("bias", ["none", "frozen", "trainable"])
@pytest.mark.parametrize("xdot", [True, False], ids=["xdot", "no_xdot"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_peft_jvp(shape, xdot, bias, dist, backend, dtype):
    M, d_in, d_out, r, K = shape
    check_case(Case(M, d_in, d_out, r, K, xdot=xdot, bias=bias, dist=dist), backend, dtype)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("bias", ["none", "frozen", "trainable"])
@pytest.mark.parametrize("xdot", [True, False], ids=["xdot", "no_xdot"])
@pytest.mark.parametrize("shape", [(1, 19, 23, 0, 1), (7, 45, 70, 0, 5), (33, 70, 19, 0, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_frozen_linear(shape, xdot, bias, backend, dtype):
    M, d_in, d_out, r, K = shape
    case = Case(M, d_in, d_out, r, K, xdot=xdot, bias=bias, dist="normal")
    y, yd = check_case(case, backend, dtype)
    if not xdot and bias != "trainable":
        assert torch.count_nonzero(yd) == 0  # nothing carries a tangent


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("explicit", ["ABb", "AB", "A", "B", "b"])
@pytest.mark.parametrize("xdot", [True, False], ids=["xdot", "no_xdot"])
def test_explicit_tangents(explicit, xdot, backend, dtype):
    case = Case(7, 23, 45, 3, 4, xdot=xdot, bias="trainable", explicit=explicit)
    p = make_problem(case)
    assert (p.seeds is None) == (explicit == "ABb")
    check_case(case, backend, dtype)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES + [pytest.param("triton", F32, id="triton-f32",
                                                                          marks=needs_triton)])
def test_frozen_linear_without_seeds(backend, dtype):
    """With nothing to regenerate (no LoRA, frozen bias) K comes from x_dot and seeds may be None."""
    case = Case(7, 19, 23, 0, 3, bias="frozen")
    p = make_problem(case)
    y_ref, yd_ref = jvp_truth(case)
    y, yd = call(p, dtype, backend, seeds=None)
    check(y, y_ref, dtype, "y")
    check(yd, yd_ref, dtype, "y_dot")


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "reference"])
@pytest.mark.parametrize("dist", ["rademacher", "normal"])
def test_explicit_equals_seeded(backend, dist):
    """Passing the materialised slices as explicit tangents must reproduce the seeded call."""
    case = Case(9, 37, 21, 4, 3, bias="trainable", dist=dist)
    p = make_problem(case)
    VA, VB, Vb = materialise(p)
    y1, yd1 = call(p, F32, backend)
    y2, yd2 = call(p, F32, backend, seeds=None, A_dot=VA.float(), B_dot=VB.float(), bias_dot=Vb.float())
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    torch.testing.assert_close(yd2, yd1, rtol=1e-6, atol=1e-6 * yd1.abs().max().item())


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("lead", [(2, 5), (2, 1, 3), ()], ids=["2x5", "2x1x3", "1d"])
def test_leading_batch_dims(lead, backend, dtype):
    K, d_in, d_out = 3, 19, 23
    case = Case(math.prod(lead), d_in, d_out, 3, K, bias="trainable", lead=lead or (1,))
    p = make_problem(case)
    y_ref, yd_ref = jvp_truth(case)
    if not lead:  # x of shape (d_in,), x_dot (K, d_in)
        p = replace(p, x=p.x[0], x_dot=p.x_dot[:, 0])
        y_ref, yd_ref = y_ref[0], yd_ref[:, 0]
    y, yd = call(p, dtype, backend)
    assert y.shape == (*lead, d_out) and yd.shape == (K, *lead, d_out)
    check(y, y_ref, dtype, "y")
    check(yd, yd_ref, dtype, "y_dot")
    # identical to the flattened 2-D call
    flat = replace(p, x=p.x.reshape(-1, d_in), x_dot=p.x_dot.reshape(K, -1, d_in))
    y2, yd2 = call(flat, dtype, backend)
    assert torch.equal(y, y2.reshape(y.shape))
    assert torch.equal(yd, yd2.reshape(yd.shape))


def _noncontig(t, kind):
    """A non-contiguous view holding the same values as t."""
    if t is None:
        return None
    fill = float("nan") if t.is_floating_point() else 0  # NaN padding: reading it would poison the result
    if kind == "T":  # last two dims stored transposed
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "slice":  # rows padded: last dim is a slice of a wider buffer
        big = torch.full((*t.shape[:-1], t.shape[-1] + 7), fill, dtype=t.dtype)
        big[..., 3:3 + t.shape[-1]] = t
        return big[..., 3:3 + t.shape[-1]]
    if kind == "step":  # every other element
        big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), fill, dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    raise ValueError(kind)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES + [pytest.param("triton", F32, id="triton-f32",
                                                                          marks=needs_triton)])
@pytest.mark.parametrize("explicit", ["", "ABb"])
def test_noncontiguous_inputs(explicit, backend, dtype):
    case = Case(7, 19, 23, 3, 2, bias="trainable", explicit=explicit)
    p = make_problem(case)
    y_ref, yd_ref = jvp_truth(case)
    y0, yd0 = call(p, dtype, backend)
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    views = dict(
        x=_noncontig(c(p.x), "slice"), x_dot=_noncontig(c(p.x_dot), "slice"), weight=_noncontig(c(p.W), "T"),
        bias=_noncontig(c(p.b), "step"), lora_A=_noncontig(c(p.A), "T"), lora_B=_noncontig(c(p.B), "slice"),
        A_dot=_noncontig(c(p.A_dot), "T"), B_dot=_noncontig(c(p.B_dot), "step"),
        bias_dot=_noncontig(c(p.bias_dot), "slice"),
        seeds=None if p.seeds is None else _noncontig(p.seeds.reshape(1, -1), "step")[0])
    for name, v in views.items():
        assert v is None or not v.is_contiguous(), name
    y, yd = call(p, dtype, backend, **views)
    check(y, y_ref, dtype, "y")
    check(yd, yd_ref, dtype, "y_dot")
    # the kernels copy or stride through the views with the same arithmetic: bit-identical results;
    # the reference goes through torch matmul, whose kernel choice may depend on strides
    for got, want in ((y, y0), (yd, yd0)):
        if backend == "reference":
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
        else:
            assert torch.equal(got, want)
    # x given as a transposed view (last-dim stride != 1)
    xt = c(p.x).T.contiguous().T
    y, yd = call(p, dtype, backend, x=xt)
    check(y, y_ref, dtype, "y (x transposed view)")
    check(yd, yd_ref, dtype, "y_dot (x transposed view)")


@needs_cpp
def test_cpp_single_row_with_odd_strides():
    """(1, d_in) operands whose row stride is meaningless (size-1 dim) must still work."""
    case = Case(1, 19, 23, 3, 2, bias="trainable")
    p = make_problem(case)
    y_ref, yd_ref = jvp_truth(case)
    x = p.x.float().reshape(19, 1).T  # (1, 19) with strides (1, 1)
    assert x.shape == (1, 19) and x.stride() == (1, 1)
    y, yd = call(p, F32, "cpp", x=x)
    check(y, y_ref, F32, "y")
    check(yd, yd_ref, F32, "y_dot")


# Strided views the cpp binding must copy rather than pass on as a leading dimension: broadcast rows
# (stride 0 from expand) and size-1 dims with a small stride.


@needs_cpp
def test_cpp_expanded_x():
    case = Case(4, 19, 23, 3, 2, xdot=False)
    p = make_problem(case)
    row = p.x[:1].float()
    x = row.expand(4, 19)  # stride (0, 1): a broadcast input
    y, yd = call(p, F32, "cpp", x=x)
    y_ref, yd_ref = call(replace(p, x=row.double().expand(4, 19).contiguous()), F64, "reference")
    check(y, y_ref, F32)
    check(yd, yd_ref, F32)


@needs_cpp
def test_cpp_rank1_lora_A_from_column():
    case = Case(5, 19, 23, 1, 2)
    p = make_problem(case)
    y_ref, yd_ref = jvp_truth(case)
    A = p.A.float().reshape(19, 1).T  # (1, 19) with strides (1, 1), e.g. a transposed column vector
    assert A.stride() == (1, 1)
    y, yd = call(p, F32, "cpp", lora_A=A)
    check(y, y_ref, F32)
    check(yd, yd_ref, F32)


@needs_cpp
def test_cpp_single_output_weight_from_column():
    case = Case(5, 19, 1, 0, 2, bias="trainable")
    p = make_problem(case)
    y_ref, yd_ref = jvp_truth(case)
    W = p.W.float().reshape(19, 1).T  # (1, 19) with strides (1, 1)
    assert W.stride() == (1, 1)
    y, yd = call(p, F32, "cpp", weight=W)
    check(y, y_ref, F32)
    check(yd, yd_ref, F32)


# ---------------------------------------------------------------------------------------------
# offsets, larger shapes, GEMM blocking edges (checked against the float64 formula: cheaper than jvp)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES + [pytest.param("triton", F32, id="triton-f32",
                                                                          marks=needs_triton)])
@pytest.mark.parametrize("dist", ["rademacher", "normal"])
def test_offsets_crossing_2_32(dist, backend, dtype):
    case = Case(5, 19, 23, 3, 2, bias="trainable", dist=dist, offset_A=(1 << 32) - 10,
                offset_bias=(1 << 33) - 3)
    check_case(case, backend, dtype)


@needs_cpp
@pytest.mark.parametrize("shape", [
    (300, 384, 200, 8, 8),    # the "realistic" size asked for
    (145, 257, 1030, 3, 2),   # crosses MC=144 rows, KC=256 reduction, NC=1024 columns
    (13, 19, 5, 3, 3),        # d_out <= 8: the 12x8 micro-kernel
    (13, 19, 8, 3, 3),
    (13, 19, 1, 1, 3),
    (6, 40, 17, 130, 2),      # 2r > KC: the low-rank segment cannot be fused into the last block
    (6, 40, 17, 128, 2),      # 2r == KC: the largest fused low-rank tail
    (5, 256, 23, 3, 2),       # d_in == KC: one full reduction block, then the fused tail
    (5, 512, 40, 8, 3),       # d_in == 2 KC
    (1, 300, 9, 2, 4),
], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("xdot", [True, False], ids=["xdot", "no_xdot"])
def test_cpp_larger_and_blocking_edges(shape, xdot):
    M, d_in, d_out, r, K = shape
    case = Case(M, d_in, d_out, r, K, xdot=xdot, bias="trainable", dist="normal" if M % 2 else "rademacher")
    p = make_problem(case)
    y_ref, yd_ref = formula(p)
    y, yd = call(p, F32, "cpp")
    check(y, y_ref, F32, "y")
    check(yd, yd_ref, F32, "y_dot")
    # and against the reference backend in float32
    y2, yd2 = call(p, F32, "reference")
    check(y, y2.double(), F32, "y vs reference-f32")
    check(yd, yd2.double(), F32, "y_dot vs reference-f32")


@needs_cpp
def test_cpp_deterministic_and_thread_count_independent():
    case = Case(300, 100, 60, 4, 3, bias="trainable")
    p = make_problem(case)
    nt = torch.get_num_threads()
    try:
        a = call(p, F32, "cpp")
        b = call(p, F32, "cpp")
        torch.set_num_threads(1)
        c = call(p, F32, "cpp")
    finally:
        torch.set_num_threads(nt)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v)
        assert torch.equal(u, w)


# ---------------------------------------------------------------------------------------------
# Triton (CPU interpreter: small shapes only)

TRITON_CASES = [
    Case(1, 19, 23, 1, 1, bias="trainable"),
    Case(7, 23, 19, 3, 2, xdot=False, dist="normal"),
    Case(7, 45, 70, 8, 3, bias="none", dist="normal"),
    Case(33, 19, 23, 3, 2, bias="trainable"),
    Case(7, 19, 23, 0, 2, bias="trainable"),
    Case(7, 19, 23, 0, 2, xdot=False),
    Case(7, 19, 23, 3, 2, bias="trainable", explicit="ABb"),
    Case(7, 19, 23, 3, 2, bias="trainable", explicit="B", dist="normal"),
    Case(10, 19, 23, 3, 2, bias="trainable", lead=(2, 5)),
    Case(5, 19, 23, 20, 2, dist="normal"),  # r > 16: padded rank block
]


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"{c.M}x{c.d_in}x{c.d_out}x{c.r}x{c.K}-{c.bias}-"
                         f"{'xdot' if c.xdot else 'noxdot'}-{c.dist}-{c.explicit or 'seeds'}-{c.lead}")
def test_triton_matches_peft_jvp(case):
    check_case(case, "triton", F32)


# ---------------------------------------------------------------------------------------------
# bfloat16


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "reference"])
@pytest.mark.parametrize("dist", ["rademacher", "normal"])
@pytest.mark.parametrize("shape", [(7, 45, 70, 3, 2), (33, 70, 45, 8, 5), (1, 19, 23, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_bfloat16(shape, dist, backend):
    M, d_in, d_out, r, K = shape
    check_case(Case(M, d_in, d_out, r, K, bias="trainable", dist=dist, bf16=True), backend, BF16)


@needs_triton
def test_bfloat16_triton():
    if TRITON_INTERPRETED:
        # Triton's CPU interpreter computes tl.dot on bfloat16 operands wrongly: the backend refuses.
        with pytest.raises(RuntimeError, match="interpreter"):
            check_case(Case(7, 19, 23, 3, 2, bias="trainable", bf16=True), "triton", BF16)
        return
    check_case(Case(7, 19, 23, 3, 2, bias="trainable", bf16=True), "triton", BF16)


# ---------------------------------------------------------------------------------------------
# the fused call: one op dispatch, one extension call, no materialised perturbations


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@needs_cpp
@pytest.mark.parametrize("K", [1, 16])
def test_fused_single_call(K, monkeypatch):
    case = Case(10, 19, 23, 3, K, bias="trainable", lead=(2, 5))
    p = make_problem(case)
    calls = {"lora_linear_dual": 0, "perturb": 0, "philox_words": 0}
    C = fk._ext.C
    for name in calls:
        orig = getattr(C, name)

        def wrapper(*a, _orig=orig, _name=name):
            calls[_name] += 1
            return _orig(*a)

        monkeypatch.setattr(C, name, wrapper)
    with _OpLog() as log:
        y, yd = call(p, F32, None)  # automatic dispatch picks cpp for float32 CPU tensors
    assert calls == {"lora_linear_dual": 1, "perturb": 0, "philox_words": 0}
    assert log.ops.count("fwdkernels.lora_linear_dual") == 1
    heavy = [o for o in log.ops if o.startswith("fwdkernels.") and o != "fwdkernels.lora_linear_dual"]
    heavy += [o for o in log.ops if o.startswith("aten.") and any(k in o for k in ("mm", "matmul", "einsum", "linear", "bmm", "rand"))]
    assert not heavy, heavy
    y_ref, yd_ref = jvp_truth(case)
    check(y, y_ref, F32)
    check(yd, yd_ref, F32)


# ---------------------------------------------------------------------------------------------
# dispatch


def test_auto_dispatch_and_forcing(monkeypatch):
    case = Case(7, 19, 23, 3, 2, bias="trainable")
    p = make_problem(case)
    x32, x64 = p.x.float(), p.x
    expected = "cpp" if HAS_CPP else "reference"
    assert lora_linear_dual_op.choose("cpu", None, x=x32) == expected
    assert lora_linear_dual_op.choose("cpu", None, x=x32.bfloat16()) == expected
    assert lora_linear_dual_op.choose("cpu", None, x=x64) == "reference"  # cpp cannot: falls back
    check(call(p, F64, None)[1], jvp_truth(case)[1], F64)
    # FWDKERNELS_BACKEND=reference really keeps the extension out of the call
    monkeypatch.setenv("FWDKERNELS_BACKEND", "reference")
    if HAS_CPP:
        def boom(*a):
            raise AssertionError("cpp called although FWDKERNELS_BACKEND=reference")
        monkeypatch.setattr(fk._ext.C, "lora_linear_dual", boom)
    check(call(p, F32, None)[1], jvp_truth(case)[1], F32)
    monkeypatch.undo()
    monkeypatch.setenv("FWDKERNELS_BACKEND", "bogus")
    with pytest.raises(RuntimeError, match="(?s)FWDKERNELS_BACKEND='bogus'.*unknown backend"):
        call(p, F32, None)
    if HAS_CPP:
        monkeypatch.setenv("FWDKERNELS_BACKEND", "cpp")
        with pytest.raises(RuntimeError, match="(?s)FWDKERNELS_BACKEND='cpp' cannot serve.*float64"):
            call(p, F64, None)


def test_forced_backend_errors():
    p = make_problem(Case(7, 19, 23, 3, 2))
    if HAS_CPP:
        with pytest.raises(RuntimeError, match=r"(?s)backend='cpp' cannot serve.*cpp: supports float32 and "
                                               r"bfloat16, not torch\.float64"):
            call(p, F64, "cpp")
    with pytest.raises(RuntimeError, match="(?s)backend='cuda' cannot serve.*cuda: "):
        call(p, F32, "cuda")
    with pytest.raises(RuntimeError, match="unknown backend 'nope'"):
        call(p, F32, "nope")


@needs_triton
def test_triton_without_interpreter_refuses_cpu(monkeypatch):
    p = make_problem(Case(7, 19, 23, 3, 2))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        call(p, F32, "triton")


# ---------------------------------------------------------------------------------------------
# opcheck


def _op_args(case: Case, dtype, backend):
    p = make_problem(case)
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    x2 = c(p.x).reshape(-1, case.d_in)
    xd = None if p.x_dot is None else c(p.x_dot).reshape(p.K, -1, case.d_in)
    ob = -1 if p.offset_bias is None or p.bias_dot is not None else p.offset_bias
    return (x2, xd, c(p.W), c(p.b), c(p.A), c(p.B), float(p.scaling), p.seeds, p.K, p.offset_A, p.offset_B, ob,
            p.dist, c(p.A_dot), c(p.B_dot), c(p.bias_dot), backend)


OPCHECK_CASES = [
    Case(7, 19, 23, 3, 2, bias="trainable"),
    Case(5, 19, 23, 3, 3, xdot=False, bias="none", dist="normal"),
    Case(5, 19, 23, 0, 2, bias="trainable"),
    Case(5, 19, 23, 3, 2, bias="trainable", explicit="ABb"),
]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES + [pytest.param("triton", F32, id="triton-f32",
                                                                          marks=needs_triton)])
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=["lora-bitfit", "no-xdot", "frozen-bitfit", "explicit"])
def test_opcheck(case, backend, dtype):
    op = torch.ops.fwdkernels.lora_linear_dual.default
    args = _op_args(case, dtype, backend)
    torch.library.opcheck(op, args)
    y, yd = op(*args)
    y_ref, yd_ref = jvp_truth(case)
    check(y, y_ref.reshape(y.shape), dtype)
    check(yd, yd_ref.reshape(yd.shape), dtype)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "reference"])
def test_opcheck_with_requires_grad_inputs(backend):
    """The op is forward-mode only (no backward formula), so with inputs that require grad opcheck's
    test_aot_dispatch_dynamic (which runs a backward) cannot pass; the remaining checks must."""
    args = list(_op_args(OPCHECK_CASES[0], F32, backend))
    for i in (0, 1, 2, 4, 5):  # x, x_dot, weight, lora_A, lora_B
        args[i] = args[i].clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.fwdkernels.lora_linear_dual.default, tuple(args),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_backward_is_a_clear_error():
    p = make_problem(Case(7, 19, 23, 3, 2))
    A = p.A.float().requires_grad_(True)
    y, yd = call(p, F32, None, lora_A=A)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        (y.sum() + yd.sum()).backward()


# ---------------------------------------------------------------------------------------------
# argument errors


def _good(dtype=F32):
    p = make_problem(Case(7, 19, 23, 3, 2, bias="frozen"))
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(x=c(p.x), x_dot=c(p.x_dot), weight=c(p.W), bias=c(p.b), lora_A=c(p.A), lora_B=c(p.B),
                scaling=p.scaling, seeds=p.seeds)


def _bad(match, exc=ValueError, **changes):
    kw = _good()
    kw.update(changes)
    with pytest.raises(exc, match=match):
        fk.lora_linear_dual(**kw)


def test_good_arguments_work():
    y, yd = fk.lora_linear_dual(**_good())
    assert y.shape == (7, 23) and yd.shape == (2, 7, 23)


def test_shape_errors():
    g = _good()
    _bad("x has 20 features but weight expects d_in=19", x=torch.randn(7, 20))
    _bad(r"x_dot must have shape \(2, 7, 19\)", x_dot=torch.randn(2, 7, 18))
    _bad(r"x_dot must have shape", x_dot=torch.randn(2, 1, 7, 19))
    _bad("x_dot has 3 tangents but K=2", x_dot=torch.randn(3, 7, 19))
    _bad(r"lora_B must have shape \(23, 3\)", lora_B=torch.randn(23, 4))
    _bad(r"lora_B must have shape \(23, 3\)", lora_B=torch.randn(3, 23))
    _bad(r"lora_A must have shape \('r', 19\)", lora_A=torch.randn(3, 18))
    _bad(r"lora_A must have shape", lora_A=torch.randn(3, 19, 1))
    _bad(r"bias must have shape \(23,\)", bias=torch.randn(22))
    _bad(r"bias must have shape \(23,\)", bias=torch.randn(1, 23))
    _bad(r"weight must have shape \(d_out, d_in\)", weight=torch.randn(23, 19, 1))
    _bad("rank r must be at least 1", lora_A=torch.randn(0, 19), lora_B=torch.randn(23, 0))
    _bad("no rows", x=torch.randn(0, 19), x_dot=None)
    _bad("A_dot must have shape", A_dot=torch.randn(2, 3, 18))
    _bad("B_dot must have shape", B_dot=torch.randn(2, 23, 4))
    _bad("A_dot has 3 tangents but K=2", A_dot=torch.randn(3, 3, 19))
    _bad(r"bias_dot must have shape \(2, 23\)", bias_dot=torch.randn(2, 22))
    assert g["x"].shape == (7, 19)


def test_dtype_errors():
    _bad("weight has dtype torch.float64 but x has torch.float32", TypeError, weight=torch.randn(23, 19, dtype=F64))
    _bad("x_dot has dtype torch.bfloat16", TypeError, x_dot=torch.randn(2, 7, 19, dtype=BF16))
    _bad("lora_B has dtype torch.float64", TypeError, lora_B=torch.randn(23, 3, dtype=F64))
    _bad("bias has dtype torch.bfloat16", TypeError, bias=torch.randn(23, dtype=BF16))
    ints = dict(x=torch.randint(0, 5, (7, 19)), x_dot=torch.randint(0, 5, (2, 7, 19)),
                weight=torch.randint(0, 5, (23, 19)), bias=None, lora_A=None, lora_B=None)
    _bad("x must be floating point", TypeError, **ints)
    _bad("weight has dtype torch.float32 but x has torch.int64", TypeError, x=torch.randint(0, 5, (7, 19)),
         x_dot=None)


def test_seed_errors():
    _bad("seeds must be int64", TypeError, seeds=torch.tensor([1.0, 2.0]))
    _bad("seeds must be int64", TypeError, seeds=torch.tensor([1, 2], dtype=torch.int32))
    _bad(r"seeds must have shape \(K,\)", seeds=torch.tensor([[1, 2]]))
    _bad("seeds must be an int64 tensor", TypeError, seeds=[1, 2])
    _bad("K .*must be at least 1", seeds=torch.tensor([], dtype=torch.int64), x_dot=None)
    _bad("K is unknown", seeds=None, x_dot=None)
    _bad("seeds are required", seeds=None)  # K from x_dot, but the LoRA slices need seeds
    _bad("seeds are required", seeds=None, A_dot=torch.randn(2, 3, 19))


def test_offset_and_pairing_errors():
    _bad("offset_A must be non-negative, got -1", offset_A=-1)
    _bad("offset_B must be non-negative, got -5", offset_B=-5)
    _bad("offset_bias must be non-negative, got -2", offset_bias=-2)
    _bad("offset_A must be an int", TypeError, offset_A=1.0)
    _bad("lora_A and lora_B must be given together", lora_B=None)
    _bad("lora_A and lora_B must be given together", lora_A=None)
    _bad("offset_bias given but bias is None", bias=None, offset_bias=0)
    _bad("bias_dot given but bias is None", bias=None, bias_dot=torch.randn(2, 23))
    _bad("A_dot/B_dot given without lora_A/lora_B", lora_A=None, lora_B=None, A_dot=torch.randn(2, 3, 19))
    _bad("dist must be one of", dist="uniform")
    _bad("x and weight must be tensors", TypeError, x=[[1.0] * 19])


@needs_cpp
def test_torch_compile_fullgraph():
    """The registered op traces under torch.compile (fake kernel) and gives the eager results."""
    g = torch.Generator().manual_seed(3)
    x, W = torch.randn(8, 16, generator=g), torch.randn(12, 16, generator=g)
    A, B, b = torch.randn(2, 16, generator=g), torch.randn(12, 2, generator=g), torch.randn(12, generator=g)
    seeds = torch.tensor([5, -7, 11])

    def f(x):
        y, yd = fk.lora_linear_dual(x, None, W, b, A, B, 2.0, seeds, 0, 32, offset_bias=56, backend="cpp")
        return y.square().sum(), yd.sum(dim=(1, 2))

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(c, a)
