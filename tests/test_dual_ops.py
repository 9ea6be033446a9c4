"""Tests of the small dual ops (fwdkernels/dual_ops.py).

Ground truth: torch.func.jvp, in float64, of the corresponding torch primitive (F.layer_norm, F.gelu,
F.silu, torch.tanh, F.embedding, F.linear, F.cross_entropy, F.mse_loss) or of a plain float64 module
written here (RMSNorm, HF-style rotary, silu(gate) * up), looped over the K tangents (a parameter
without a tangent gets a zero tangent). Inputs are drawn in float64 (never zero), rounded to the dtype
under test, and the reference runs on those rounded values upcast to float64, so the comparison
measures only the op's own arithmetic. Primal outputs are also compared with the torch / transformers
implementations they replace (F.layer_norm, LlamaRMSNorm, ACT2FN activations, apply_rotary_pos_emb,
ForCausalLMLoss).
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

import fwdkernels as fk
from fwdkernels import dual_ops

# torch's forward-AD decompositions (loaded on the first jvp) still go through torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
DTYPES = [pytest.param(F64, id="f64"), pytest.param(F32, id="f32"), pytest.param(BF16, id="bf16")]
# relative-norm tolerance of the op (run in dtype) against the float64 jvp
TOL = {F64: 1e-10, F32: 1e-5, BF16: 2e-2}
# (d, K): odd feature sizes, each K in {1, 3, 8}
DK = [(1, 3), (7, 8), (33, 1), (33, 3)]


# Every test runs twice: with the automatic backend choice (cpp for float32 / bfloat16 CPU tensors when
# fwdkernels._C is loaded, reference otherwise) and with the reference backend forced.
@pytest.fixture(autouse=True, params=["auto", "reference"])
def dual_backend(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setenv("FWDKERNELS_BACKEND", "reference")
    else:
        monkeypatch.delenv("FWDKERNELS_BACKEND", raising=False)
    return request.param


# ---------------------------------------------------------------------------------------------
# helpers


def seeded(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def rnd(g, *shape, dtype=F64, scale=1.0, offset=0.0):
    """float64 normals rounded to dtype, with no zeros (|v| >= 0.05 before rounding)."""
    v = torch.randn(*shape, generator=g, dtype=F64)
    v = torch.where(v.abs() < 0.05, torch.copysign(torch.full_like(v, 0.05), v), v)
    return (v * scale + offset).to(dtype)


def relerr(a, b):
    a, b = a.double(), b.double()
    nb = b.norm()
    return ((a - b).norm() / nb).item() if nb > 0 else (a - b).norm().item()


def jvp_ref(fn, primals, tangents):
    """(out, out_dot (K, ...)) of fn in float64; tangents[i] is (K, *primals[i].shape) or None (zero)."""
    primals = tuple(p.double() for p in primals)
    K = next(t.shape[0] for t in tangents if t is not None)
    outs = []
    for k in range(K):
        tk = tuple(torch.zeros_like(p) if t is None else t[k].double() for p, t in zip(primals, tangents))
        out, out_dot = jvp(fn, primals, tk)
        outs.append(out_dot)
    return out, torch.stack(outs)


def check(y, y_dot, ref_y, ref_dot, dtype, K=None, shape=None):
    assert y.dtype == dtype
    assert relerr(y, ref_y) < TOL[dtype], relerr(y, ref_y)
    if ref_dot is None:
        assert y_dot is None
        return
    assert y_dot is not None and y_dot.dtype == dtype
    assert y_dot.shape == ref_dot.shape
    if shape is not None:
        assert y_dot.shape == (K, *shape)
    err = relerr(y_dot, ref_dot)
    assert err < TOL[dtype], err


def maybe(flag, t):
    return t if flag else None


FLAGS3 = list(itertools.product([True, False], repeat=3))
FLAGS2 = list(itertools.product([True, False], repeat=2))


# ---------------------------------------------------------------------------------------------
# layer norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,K", DK)
@pytest.mark.parametrize("has_xd,has_wd,has_bd", FLAGS3, ids=lambda f: "T" if f else "F")
def test_layer_norm_dual(dtype, d, K, has_xd, has_wd, has_bd):
    g = seeded("ln", str(dtype), d, K, has_xd, has_wd, has_bd)
    x = rnd(g, 2, 3, d, dtype=dtype, scale=2.0, offset=0.5)
    w, b = rnd(g, d, dtype=dtype, offset=1.0), rnd(g, d, dtype=dtype)
    xd, wd, bd = rnd(g, K, 2, 3, d, dtype=dtype), rnd(g, K, d, dtype=dtype), rnd(g, K, d, dtype=dtype)
    xd, wd, bd = maybe(has_xd, xd), maybe(has_wd, wd), maybe(has_bd, bd)
    eps = 1e-5
    y, y_dot = fk.layer_norm_dual(x, xd, w, b, eps, weight_dot=wd, bias_dot=bd)
    fn = lambda x_, w_, b_: F.layer_norm(x_, (d,), w_, b_, eps)  # noqa: E731
    if has_xd or has_wd or has_bd:
        ref_y, ref_dot = jvp_ref(fn, (x, w, b), (xd, wd, bd))
    else:
        ref_y, ref_dot = fn(x.double(), w.double(), b.double()), None
    check(y, y_dot, ref_y, ref_dot, dtype, K, x.shape)
    assert torch.equal(y, F.layer_norm(x, (d,), w, b, eps))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_dual_no_affine(dtype):
    g = seeded("ln-noaff", str(dtype))
    x, xd = rnd(g, 5, 33, dtype=dtype, offset=-1.0), rnd(g, 3, 5, 33, dtype=dtype)
    y, y_dot = fk.layer_norm_dual(x, xd, None, None, 1e-6)
    ref_y, ref_dot = jvp_ref(lambda x_: F.layer_norm(x_, (33,), None, None, 1e-6), (x,), (xd,))
    check(y, y_dot, ref_y, ref_dot, dtype)
    # weight only
    w = rnd(g, 33, dtype=dtype, offset=1.0)
    wd = rnd(g, 3, 33, dtype=dtype)
    y, y_dot = fk.layer_norm_dual(x, xd, w, None, 1e-6, weight_dot=wd)
    ref_y, ref_dot = jvp_ref(lambda x_, w_: F.layer_norm(x_, (33,), w_, None, 1e-6), (x, w), (xd, wd))
    check(y, y_dot, ref_y, ref_dot, dtype)


def test_layer_norm_dual_large_mean():
    # a large common offset: the tangent formula must not lose precision to it (float32)
    g = seeded("ln-offset")
    x, xd = rnd(g, 4, 64, dtype=F32, offset=300.0), rnd(g, 8, 4, 64, dtype=F32)
    w, b = rnd(g, 64, dtype=F32), rnd(g, 64, dtype=F32)
    _, y_dot = fk.layer_norm_dual(x, xd, w, b, 1e-5)
    _, ref = jvp_ref(lambda x_: F.layer_norm(x_, (64,), w.double(), b.double(), 1e-5), (x,), (xd,))
    assert relerr(y_dot, ref) < 1e-4


# ---------------------------------------------------------------------------------------------
# RMS norm


def rms_ref(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,K", DK)
@pytest.mark.parametrize("has_xd,has_wd", FLAGS2, ids=lambda f: "T" if f else "F")
def test_rms_norm_dual(dtype, d, K, has_xd, has_wd):
    g = seeded("rms", str(dtype), d, K, has_xd, has_wd)
    x = rnd(g, 2, 3, d, dtype=dtype, scale=2.0, offset=0.3)
    w = rnd(g, d, dtype=dtype, offset=1.0)
    xd, wd = maybe(has_xd, rnd(g, K, 2, 3, d, dtype=dtype)), maybe(has_wd, rnd(g, K, d, dtype=dtype))
    eps = 1e-6
    y, y_dot = fk.rms_norm_dual(x, xd, w, eps, weight_dot=wd)
    fn = lambda x_, w_: rms_ref(x_, w_, eps)  # noqa: E731
    if has_xd or has_wd:
        ref_y, ref_dot = jvp_ref(fn, (x, w), (xd, wd))
    else:
        ref_y, ref_dot = fn(x.double(), w.double()), None
    check(y, y_dot, ref_y, ref_dot, dtype, K, x.shape)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_rms_norm_primal_matches_llama(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = seeded("rms-hf", str(dtype))
    for d in (1, 7, 33):
        m = LlamaRMSNorm(d, eps=1e-5).to(dtype)
        with torch.no_grad():
            m.weight.copy_(rnd(g, d, dtype=dtype, offset=1.0))
        x = rnd(g, 2, 5, d, dtype=dtype, scale=3.0)
        with torch.no_grad():
            want = m(x)
        y, y_dot = fk.rms_norm_dual(x, None, m.weight.detach(), 1e-5)
        assert y_dot is None
        assert y.dtype == want.dtype and torch.equal(y, want)


def test_rms_norm_dual_no_weight():
    g = seeded("rms-now")
    x, xd = rnd(g, 4, 7), rnd(g, 3, 4, 7)
    y, y_dot = fk.rms_norm_dual(x, xd, None, 1e-6)
    ref_y, ref_dot = jvp_ref(lambda x_: rms_ref(x_, 1.0, 1e-6), (x,), (xd,))
    check(y, y_dot, ref_y, ref_dot, F64)


# ---------------------------------------------------------------------------------------------
# elementwise activations


ACTS = {
    "gelu": (lambda x, xd: fk.gelu_dual(x, xd), lambda x: F.gelu(x)),
    "gelu_tanh": (lambda x, xd: fk.gelu_dual(x, xd, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")),
    "silu": (fk.silu_dual, F.silu),
    "tanh": (fk.tanh_dual, torch.tanh),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,K", DK)
@pytest.mark.parametrize("act", list(ACTS))
def test_activation_dual(act, dtype, d, K):
    ours, prim = ACTS[act]
    g = seeded("act", act, str(dtype), d, K)
    x, xd = rnd(g, 3, 2, d, dtype=dtype, scale=2.5), rnd(g, K, 3, 2, d, dtype=dtype)
    y, y_dot = ours(x, xd)
    ref_y, ref_dot = jvp_ref(prim, (x,), (xd,))
    check(y, y_dot, ref_y, ref_dot, dtype, K, x.shape)
    y0, none = ours(x, None)
    assert none is None and torch.equal(y0, y)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_activation_primal_matches_transformers(dtype):
    from transformers.activations import ACT2FN

    g = seeded("act-hf", str(dtype))
    x = rnd(g, 4, 33, dtype=dtype, scale=3.0)
    assert torch.equal(fk.gelu_dual(x, None)[0], ACT2FN["gelu"](x))
    assert torch.equal(fk.gelu_dual(x, None, approximate="tanh")[0], ACT2FN["gelu_pytorch_tanh"](x))
    tol = 1e-6 if dtype == F32 else 1e-2
    torch.testing.assert_close(fk.gelu_dual(x, None, approximate="tanh")[0], ACT2FN["gelu_new"](x),
                               rtol=tol, atol=tol)
    assert torch.equal(fk.silu_dual(x, None)[0], ACT2FN["silu"](x))
    assert torch.equal(fk.tanh_dual(x, None)[0], ACT2FN["tanh"](x))


def test_gelu_bad_approximate():
    with pytest.raises(ValueError, match="approximate"):
        fk.gelu_dual(torch.randn(3), None, approximate="sigmoid")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,K", DK)
@pytest.mark.parametrize("has_gd,has_ud", FLAGS2, ids=lambda f: "T" if f else "F")
def test_gated_mlp_act_dual(dtype, d, K, has_gd, has_ud):
    g = seeded("gated", str(dtype), d, K, has_gd, has_ud)
    gate, up = rnd(g, 2, 3, d, dtype=dtype, scale=2.0), rnd(g, 2, 3, d, dtype=dtype)
    gd, ud = maybe(has_gd, rnd(g, K, 2, 3, d, dtype=dtype)), maybe(has_ud, rnd(g, K, 2, 3, d, dtype=dtype))
    y, y_dot = fk.gated_mlp_act_dual(gate, gd, up, ud)
    fn = lambda g_, u_: F.silu(g_) * u_  # noqa: E731
    if has_gd or has_ud:
        ref_y, ref_dot = jvp_ref(fn, (gate, up), (gd, ud))
    else:
        ref_y, ref_dot = fn(gate.double(), up.double()), None
    check(y, y_dot, ref_y, ref_dot, dtype, K, gate.shape)
    if dtype != F64:
        assert torch.equal(y, F.silu(gate) * up)


# ---------------------------------------------------------------------------------------------
# rotary


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(B, L, D, dtype, g):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=F64) / D))
    pos = torch.randint(0, 100, (B, L), generator=g).to(F64)
    emb = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1)  # (B, L, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,K", [(2, 3), (8, 8), (34, 1)])
@pytest.mark.parametrize("cs", ["BLD", "LD", "random-BLD"])
def test_rotary_dual(dtype, D, K, cs):
    g = seeded("rope", str(dtype), D, K, cs)
    B, H, L = 2, 3, 5
    x, xd = rnd(g, B, H, L, D, dtype=dtype), rnd(g, K, B, H, L, D, dtype=dtype)
    if cs == "random-BLD":  # halves of cos / sin differ: exercises both half formulas
        cos, sin = rnd(g, B, L, D, dtype=dtype), rnd(g, B, L, D, dtype=dtype)
    else:
        cos, sin = rope_cos_sin(B, L, D, dtype, g)
        if cs == "LD":
            cos, sin = cos[0], sin[0]
    y, y_dot = fk.rotary_dual(x, xd, cos, sin)
    c, s = (cos.double(), sin.double()) if cos.dim() == 2 else (cos.double()[:, None], sin.double()[:, None])
    ref_y, ref_dot = jvp_ref(lambda x_: x_ * c + rotate_half(x_) * s, (x,), (xd,))
    check(y, y_dot, ref_y, ref_dot, dtype, K, x.shape)
    if dtype != F64 and cos.dim() == 3:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        want, _ = apply_rotary_pos_emb(x, x, cos, sin)
        assert torch.equal(y, want)
    assert fk.rotary_dual(x, None, cos, sin)[1] is None


def test_rotary_dual_unsqueeze_dim2():
    g = seeded("rope-bl")
    B, L, H, D, K = 2, 4, 3, 6, 3
    x, xd = rnd(g, B, L, H, D), rnd(g, K, B, L, H, D)
    cos, sin = rope_cos_sin(B, L, D, F64, g)
    y, y_dot = fk.rotary_dual(x, xd, cos, sin, unsqueeze_dim=2)
    ref_y, ref_dot = jvp_ref(lambda x_: x_ * cos[:, :, None] + rotate_half(x_) * sin[:, :, None], (x,), (xd,))
    check(y, y_dot, ref_y, ref_dot, F64)


def test_rotary_dual_errors():
    x, cos = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="even"):
        fk.rotary_dual(torch.randn(1, 2, 3, 7), None, torch.randn(1, 3, 7), torch.randn(1, 3, 7))
    with pytest.raises(ValueError, match="broadcast"):
        fk.rotary_dual(x, None, torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="same shape"):
        fk.rotary_dual(x, None, cos, torch.randn(3, 8))
    with pytest.raises(ValueError, match="x_dot"):
        fk.rotary_dual(x, torch.randn(2, 1, 2, 3, 6), cos, cos)


# ---------------------------------------------------------------------------------------------
# embedding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,K", DK)
@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_embedding_dual(dtype, d, K, padding_idx):
    g = seeded("emb", str(dtype), d, K, padding_idx)
    V = 11
    w, wd = rnd(g, V, d, dtype=dtype), rnd(g, K, V, d, dtype=dtype)
    ids = torch.randint(0, V, (3, 5), generator=g)
    ids[0, :2] = 2
    ids[1, 0] = V - 1
    y, y_dot = fk.embedding_dual(ids, w, wd, padding_idx=padding_idx)
    wd_ref = wd.clone()
    if padding_idx is not None:  # the padding row is frozen
        wd_ref[:, padding_idx] = 0
    ref_y, ref_dot = jvp_ref(lambda w_: F.embedding(ids, w_, padding_idx), (w,), (wd_ref,))
    check(y, y_dot, ref_y, ref_dot, dtype, K, (3, 5, d))
    assert torch.equal(y, F.embedding(ids, w, padding_idx))
    if padding_idx is not None:
        assert (y_dot[:, ids == (padding_idx % V)] == 0).all()
    y0, none = fk.embedding_dual(ids, w)
    assert none is None and torch.equal(y0, y)


def test_embedding_dual_errors():
    w = torch.randn(5, 3)
    with pytest.raises(TypeError, match="integer"):
        fk.embedding_dual(torch.zeros(2), w)
    with pytest.raises(ValueError, match="padding_idx"):
        fk.embedding_dual(torch.zeros(2, dtype=torch.long), w, padding_idx=5)
    with pytest.raises(ValueError, match="weight_dot"):
        fk.embedding_dual(torch.zeros(2, dtype=torch.long), w, torch.randn(2, 5, 4))


# ---------------------------------------------------------------------------------------------
# add, linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_ad,has_bd", FLAGS2, ids=lambda f: "T" if f else "F")
@pytest.mark.parametrize("bshape", ["same", "broadcast"])
def test_add_dual(dtype, has_ad, has_bd, bshape):
    g = seeded("add", str(dtype), has_ad, has_bd, bshape)
    K = 3
    a = rnd(g, 2, 4, 7, dtype=dtype)
    b = rnd(g, *((2, 4, 7) if bshape == "same" else (7,)), dtype=dtype)
    ad, bd = maybe(has_ad, rnd(g, K, *a.shape, dtype=dtype)), maybe(has_bd, rnd(g, K, *b.shape, dtype=dtype))
    y, y_dot = fk.add_dual(a, ad, b, bd)
    if has_ad or has_bd:
        ref_y, ref_dot = jvp_ref(torch.add, (a, b), (ad, bd))
    else:
        ref_y, ref_dot = a.double() + b.double(), None
    check(y, y_dot, ref_y, ref_dot, dtype, K, a.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_in,K", DK)
@pytest.mark.parametrize("has_xd,has_wd,has_bd", FLAGS3, ids=lambda f: "T" if f else "F")
@pytest.mark.parametrize("lead", [(2, 3), ()], ids=["BL", "1d"])
def test_linear_dual(dtype, d_in, K, has_xd, has_wd, has_bd, lead):
    g = seeded("lin", str(dtype), d_in, K, has_xd, has_wd, has_bd, lead)
    d_out = 5
    x, w, b = rnd(g, *lead, d_in, dtype=dtype), rnd(g, d_out, d_in, dtype=dtype), rnd(g, d_out, dtype=dtype)
    xd = maybe(has_xd, rnd(g, K, *lead, d_in, dtype=dtype))
    wd = maybe(has_wd, rnd(g, K, d_out, d_in, dtype=dtype))
    bd = maybe(has_bd, rnd(g, K, d_out, dtype=dtype))
    y, y_dot = fk.linear_dual(x, xd, w, b, weight_dot=wd, bias_dot=bd)
    if has_xd or has_wd or has_bd:
        ref_y, ref_dot = jvp_ref(F.linear, (x, w, b), (xd, wd, bd))
    else:
        ref_y, ref_dot = F.linear(x.double(), w.double(), b.double()), None
    check(y, y_dot, ref_y, ref_dot, dtype, K, (*lead, d_out))


def test_linear_dual_no_bias():
    g = seeded("lin-nob")
    x, xd, w, wd = rnd(g, 4, 6), rnd(g, 8, 4, 6), rnd(g, 3, 6), rnd(g, 8, 3, 6)
    y, y_dot = fk.linear_dual(x, xd, w, None, weight_dot=wd)
    ref_y, ref_dot = jvp_ref(lambda x_, w_: F.linear(x_, w_), (x, w), (xd, wd))
    check(y, y_dot, ref_y, ref_dot, F64)
    with pytest.raises(ValueError, match="bias_dot given but bias is None"):
        fk.linear_dual(x, xd, w, None, bias_dot=rnd(g, 8, 3))


# ---------------------------------------------------------------------------------------------
# losses


def ce_case(g, dtype, lead, C, K, n_ignored):
    logits = rnd(g, *lead, C, dtype=dtype, scale=3.0)
    ld = rnd(g, K, *lead, C, dtype=dtype)
    labels = torch.randint(0, C, lead, generator=g)
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:n_ignored]] = -100
    return logits, ld, labels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,K", [(1, 3), (7, 8), (33, 1), (50, 3)])
@pytest.mark.parametrize("lead", [(6,), (2, 5)], ids=["N", "BL"])
@pytest.mark.parametrize("n_ignored", [0, 3])
def test_cross_entropy_dual(dtype, C, K, lead, n_ignored):
    g = seeded("ce", str(dtype), C, K, lead, n_ignored)
    logits, ld, labels = ce_case(g, dtype, lead, C, K, n_ignored)
    loss, loss_dot = fk.cross_entropy_dual(logits, ld, labels)
    fn = lambda l_: F.cross_entropy(l_.reshape(-1, C), labels.reshape(-1), ignore_index=-100)  # noqa: E731
    ref, ref_dot = jvp_ref(fn, (logits,), (ld,))
    assert loss.shape == () and loss_dot.shape == (K,)
    check(loss, loss_dot, ref, ref_dot, dtype)
    loss0, none = fk.cross_entropy_dual(logits, None, labels)
    assert none is None and torch.equal(loss0, loss)
    if dtype == F32:
        torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, C), labels.reshape(-1)),
                                   rtol=1e-6, atol=1e-6)


def test_cross_entropy_dual_custom_ignore_index():
    g = seeded("ce-ii")
    logits, ld, labels = ce_case(g, F64, (9,), 6, 3, 0)
    labels[[1, 4]] = 5  # ignore class 5
    loss, loss_dot = fk.cross_entropy_dual(logits, ld, labels, ignore_index=5)
    ref, ref_dot = jvp_ref(lambda l_: F.cross_entropy(l_, labels, ignore_index=5), (logits,), (ld,))
    check(loss, loss_dot, ref, ref_dot, F64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_dual_all_ignored(dtype):
    g = seeded("ce-all", str(dtype))
    logits, ld = rnd(g, 4, 7, dtype=dtype), rnd(g, 3, 4, 7, dtype=dtype)
    labels = torch.full((4,), -100)
    loss, loss_dot = fk.cross_entropy_dual(logits, ld, labels)
    assert loss.dtype == dtype and loss.item() == 0.0
    assert loss_dot.dtype == dtype and torch.equal(loss_dot, torch.zeros(3, dtype=dtype))
    loss, none = fk.cross_entropy_dual(logits, None, labels)
    assert loss.item() == 0.0 and none is None


def test_cross_entropy_dual_stable_large_logits():
    # exp of these overflows float32; logits near 300 carry float32 rounding ~3e-5 into p, hence 1e-4
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [300.0, 301.0, 0.0]])
    ld = torch.randn(2, 2, 3, generator=seeded("ce-big"))
    labels = torch.tensor([1, 0])
    loss, loss_dot = fk.cross_entropy_dual(logits, ld, labels)
    ref, ref_dot = jvp_ref(lambda l_: F.cross_entropy(l_, labels), (logits,), (ld,))
    assert torch.isfinite(loss) and torch.isfinite(loss_dot).all()
    assert relerr(loss, ref) < 1e-6 and relerr(loss_dot, ref_dot) < 1e-4


def test_cross_entropy_dual_bf16_chunked(monkeypatch):
    # the bf16 tangent is upcast in column chunks; force many (uneven) chunks
    monkeypatch.setattr(dual_ops, "_CONTRACT_CHUNK", 3 * 17)
    g = seeded("ce-chunk")
    logits, ld, labels = ce_case(g, BF16, (4, 5), 13, 3, 2)
    loss, loss_dot = fk.cross_entropy_dual(logits, ld, labels)
    ref, ref_dot = jvp_ref(lambda l_: F.cross_entropy(l_.reshape(-1, 13), labels.reshape(-1)), (logits,), (ld,))
    check(loss, loss_dot, ref, ref_dot, BF16)
    monkeypatch.setattr(dual_ops, "_CONTRACT_CHUNK", 1 << 22)
    _, loss_dot_whole = fk.cross_entropy_dual(logits, ld, labels)
    assert relerr(loss_dot, loss_dot_whole) < 1e-2


def test_cross_entropy_dual_errors():
    logits = torch.randn(4, 5)
    with pytest.raises(ValueError, match="labels must be in"):
        fk.cross_entropy_dual(logits, None, torch.tensor([0, 1, 5, -100]))
    with pytest.raises(ValueError, match="labels must be in"):
        fk.cross_entropy_dual(logits, None, torch.tensor([0, 1, -3, 2]))
    with pytest.raises(ValueError, match="labels must have shape"):
        fk.cross_entropy_dual(logits, None, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        fk.cross_entropy_dual(logits, None, torch.zeros(4))
    with pytest.raises(ValueError, match="logits_dot"):
        fk.cross_entropy_dual(logits, torch.randn(2, 4, 6), torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,K", [(7, 8), (33, 3)])
@pytest.mark.parametrize("n_ignored", [0, 4])
def test_causal_lm_loss_dual(dtype, V, K, n_ignored):
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = seeded("clm", str(dtype), V, K, n_ignored)
    B, L = 2, 6
    logits, ld, labels = ce_case(g, dtype, (B, L), V, K, n_ignored)
    loss, loss_dot = fk.causal_lm_loss_dual(logits, ld, labels)
    fn = lambda l_: F.cross_entropy(l_[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))  # noqa: E731
    ref, ref_dot = jvp_ref(fn, (logits,), (ld,))
    check(loss, loss_dot, ref, ref_dot, dtype)
    if dtype == F32:
        torch.testing.assert_close(loss, ForCausalLMLoss(logits, labels, V), rtol=1e-6, atol=1e-6)


def test_causal_lm_loss_dual_all_ignored_after_shift():
    # only the first label is real: nothing is left to predict after the shift
    logits, ld = torch.randn(1, 4, 5), torch.randn(2, 1, 4, 5)
    labels = torch.tensor([[3, -100, -100, -100]])
    loss, loss_dot = fk.causal_lm_loss_dual(logits, ld, labels)
    assert loss.item() == 0.0 and torch.equal(loss_dot, torch.zeros(2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,K", [((5,), 3), ((4, 1), 8), ((2, 3, 7), 1)])
def test_mse_loss_dual(dtype, shape, K):
    g = seeded("mse", str(dtype), shape, K)
    pred, pd, target = rnd(g, *shape, dtype=dtype), rnd(g, K, *shape, dtype=dtype), rnd(g, *shape, dtype=dtype)
    loss, loss_dot = fk.mse_loss_dual(pred, pd, target)
    ref, ref_dot = jvp_ref(lambda p_: F.mse_loss(p_, target.double()), (pred,), (pd,))
    check(loss, loss_dot, ref, ref_dot, dtype)
    assert fk.mse_loss_dual(pred, None, target)[1] is None
    with pytest.raises(ValueError, match="target must have"):
        fk.mse_loss_dual(pred, pd, target.reshape(-1)[:-1])


# ---------------------------------------------------------------------------------------------
# input validation, no mutation


def test_inputs_not_modified():
    g = seeded("nomut")
    for dtype in (F32, BF16):
        x, xd = rnd(g, 3, 7, dtype=dtype), rnd(g, 2, 3, 7, dtype=dtype)
        w, b = rnd(g, 7, dtype=dtype), rnd(g, 7, dtype=dtype)
        wd, bd = rnd(g, 2, 7, dtype=dtype), rnd(g, 2, 7, dtype=dtype)
        W, Wd, Bd = rnd(g, 4, 7, dtype=dtype), rnd(g, 2, 4, 7, dtype=dtype), rnd(g, 2, 4, dtype=dtype)
        cos, sin = rnd(g, 3, 4, dtype=dtype), rnd(g, 3, 4, dtype=dtype)
        q, qd = rnd(g, 2, 3, 4, dtype=dtype), rnd(g, 2, 2, 3, 4, dtype=dtype)
        args = [x, xd, w, b, wd, bd, W, Wd, Bd, cos, sin, q, qd]
        saved = [a.clone() for a in args]
        fk.layer_norm_dual(x, xd, w, b, 1e-5, wd, bd)
        fk.layer_norm_dual(x, None, w, b, 1e-5, wd, bd)
        fk.rms_norm_dual(x, xd, w, 1e-6, wd)
        fk.gelu_dual(x, xd), fk.silu_dual(x, xd), fk.tanh_dual(x, xd)
        fk.gated_mlp_act_dual(x, xd, w.expand(3, 7), xd)
        fk.add_dual(x, xd, x, None)
        fk.linear_dual(x, xd, W, b[:4], Wd, Bd)
        fk.rotary_dual(q, qd, cos, sin)
        for a, s in zip(args, saved):
            assert torch.equal(a, s)


def test_tangent_shape_and_k_errors():
    x, w, b = torch.randn(3, 7), torch.randn(7), torch.randn(7)
    with pytest.raises(ValueError, match=r"x_dot must have shape \(K, 3, 7\)"):
        fk.layer_norm_dual(x, torch.randn(2, 3, 6), w, b)
    with pytest.raises(ValueError, match="x_dot must have shape"):
        fk.layer_norm_dual(x, torch.randn(3, 7), w, b)  # missing K dim
    with pytest.raises(ValueError, match="weight_dot has 3 tangents but x_dot has K=2"):
        fk.layer_norm_dual(x, torch.randn(2, 3, 7), w, b, weight_dot=torch.randn(3, 7))
    with pytest.raises(ValueError, match="bias_dot has 1 tangents"):
        fk.layer_norm_dual(x, None, w, b, weight_dot=torch.randn(2, 7), bias_dot=torch.randn(1, 7))
    with pytest.raises(ValueError, match="weight_dot given but weight is None"):
        fk.layer_norm_dual(x, None, None, b, weight_dot=torch.randn(2, 7))
    with pytest.raises(ValueError, match="weight must have shape"):
        fk.layer_norm_dual(x, None, torch.randn(6), b)
    with pytest.raises(TypeError, match="dtype"):
        fk.layer_norm_dual(x, torch.randn(2, 3, 7, dtype=F64), w, b)
    with pytest.raises(ValueError, match="K = 0"):
        fk.silu_dual(x, torch.randn(0, 3, 7))
    with pytest.raises(ValueError, match="up_dot has 3 tangents but gate_dot has K=2"):
        fk.gated_mlp_act_dual(x, torch.randn(2, 3, 7), x, torch.randn(3, 3, 7))
    with pytest.raises(ValueError, match="up must have shape"):
        fk.gated_mlp_act_dual(x, None, torch.randn(3, 6), None)
    with pytest.raises(ValueError, match="b_dot has 4 tangents"):
        fk.add_dual(x, torch.randn(2, 3, 7), x, torch.randn(4, 3, 7))
    with pytest.raises(ValueError, match="weight_dot must have shape"):
        fk.linear_dual(x, None, torch.randn(5, 7), None, weight_dot=torch.randn(2, 7, 5))
    with pytest.raises(ValueError, match="d_in=6"):
        fk.linear_dual(x, None, torch.randn(5, 6), None)
    with pytest.raises(ValueError, match="weight_dot has 2 tangents"):
        fk.rms_norm_dual(x, torch.randn(3, 3, 7), w, weight_dot=torch.randn(2, 7))
    with pytest.raises(TypeError, match="floating point"):
        fk.tanh_dual(torch.ones(3, dtype=torch.long), None)


# ---------------------------------------------------------------------------------------------
# the cpp backend: chosen for float32 / bfloat16, equal to the reference, in place, strided, opcheck

needs_cpp = pytest.mark.skipif(fk._ext.C is None, reason="fwdkernels._C is not loaded")


@needs_cpp
def test_cpp_backend_choice(dual_backend):
    if dual_backend != "auto":
        pytest.skip("checks the automatic choice")
    for op in dual_ops.DUAL_OPS:
        assert op.choose("cpu", dtype=F32) == "cpp", op.name
        assert op.choose("cpu", dtype=BF16) == "cpp", op.name
        assert op.choose("cpu", dtype=F64) == "reference", op.name
        with pytest.raises(RuntimeError, match="float32 and bfloat16"):
            op.choose("cpu", backend="cpp", dtype=F64)
    x, xd = torch.randn(3, 5, dtype=F64), torch.randn(2, 3, 5, dtype=F64)
    with pytest.raises(RuntimeError, match="backend='cpp' cannot serve"):
        fk.silu_dual(x, xd, backend="cpp")


def _both(fn, *args, **kw):
    """(reference result, cpp result) of one dual op call."""
    return fn(*args, backend="reference", **kw), fn(*args, backend="cpp", **kw)


def _close(a, b, dtype):
    tol = {F32: 2e-6, BF16: 1e-2}[dtype]
    assert a.dtype == b.dtype and a.shape == b.shape
    assert relerr(b, a) < tol, relerr(b, a)


@needs_cpp
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_cpp_equals_reference_larger_shapes(dtype, dual_backend):
    if dual_backend != "auto":
        pytest.skip("backends are forced per call here")
    g = seeded("cpp-vs-ref", str(dtype))
    K, R, d = 5, 37, 384  # rows and widths past the kernels' blocking (512-element blocks, 8-row tasks)
    x, xd = rnd(g, R, d, dtype=dtype, scale=2.0, offset=0.5), rnd(g, K, R, d, dtype=dtype)
    w, b, wd, bd = rnd(g, d, dtype=dtype), rnd(g, d, dtype=dtype), rnd(g, K, d, dtype=dtype), rnd(g, K, d, dtype=dtype)
    for (ya, ta), (yb, tb) in (_both(fk.layer_norm_dual, x, xd, w, b, 1e-5, wd, bd),
                               _both(fk.rms_norm_dual, x, xd, w, 1e-6, wd),
                               _both(fk.gelu_dual, x, xd), _both(fk.gelu_dual, x, xd, approximate="tanh"),
                               _both(fk.silu_dual, x, xd), _both(fk.tanh_dual, x, xd),
                               _both(fk.gated_mlp_act_dual, x, xd, w.expand(R, d), xd)):
        assert torch.equal(ya, yb)  # the primal is the torch op's on both backends
        _close(ta, tb, dtype)
    # rotary on a transposed (B, L, H, D) buffer: the kernel reads it through strides
    B, L, H, D = 2, 7, 3, 10
    q, qd = rnd(g, B, L, H, D, dtype=dtype).transpose(1, 2), rnd(g, K, B, L, H, D, dtype=dtype).transpose(2, 3)
    cos, sin = rope_cos_sin(B, L, D, dtype, g)
    (ya, ta), (yb, tb) = _both(fk.rotary_dual, q, qd, cos, sin)
    assert torch.equal(ya, yb) and tb.is_contiguous()
    _close(ta, tb, dtype)
    labels = torch.randint(0, d, (R,), generator=g)
    labels[::4] = -100
    (la, lda), (lb, ldb) = _both(fk.cross_entropy_dual, x, xd, labels)
    assert torch.equal(la, lb)
    _close(lda, ldb, dtype)


@needs_cpp
def test_cpp_inplace_writes_into_the_tangent(dual_backend):
    if dual_backend != "auto":
        pytest.skip("cpp only")
    g = seeded("cpp-inplace")
    x, xd = rnd(g, 4, 9, dtype=F32), rnd(g, 3, 4, 9, dtype=F32)
    want = fk.gelu_dual(x, xd.clone())[1]
    buf = xd.clone()
    got = fk.gelu_dual(x, buf, inplace=True)[1]
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, want)
    up, ud = rnd(g, 4, 9, dtype=F32), rnd(g, 3, 4, 9, dtype=F32)
    want = fk.gated_mlp_act_dual(x, xd.clone(), up, ud)[1]
    buf = xd.clone()
    got = fk.gated_mlp_act_dual(x, buf, up, ud, inplace=True)[1]
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, want)


@needs_cpp
def test_cpp_custom_ops_opcheck(dual_backend):
    if dual_backend != "auto":
        pytest.skip("cpp only")
    g = seeded("opcheck")
    x, xd, w = rnd(g, 3, 8, dtype=F32), rnd(g, 2, 3, 8, dtype=F32), rnd(g, 8, dtype=F32)
    ops = torch.ops.fwdkernels
    torch.library.opcheck(ops.norm_dual, (x, xd, w, w, None, None, 1e-5, 2, False))
    torch.library.opcheck(ops.norm_dual, (x, None, w, None, xd[:, 0], None, 1e-6, 2, True))
    torch.library.opcheck(ops.activation_dual, (x, xd, 0, 2))
    torch.library.opcheck(ops.gated_act_dual, (x, xd, x, None, 2))
    q, qd = rnd(g, 1, 2, 3, 8, dtype=F32), rnd(g, 2, 1, 2, 3, 8, dtype=F32)
    cs = rnd(g, 1, 1, 3, 8, dtype=F32)
    torch.library.opcheck(ops.rotary_dual, (q, qd, cs, cs, 2))
    torch.library.opcheck(ops.cross_entropy_dual, (x, xd, torch.tensor([1, -100, 7]), -100, 2))
