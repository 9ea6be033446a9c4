"""The `cuda` backend (fwdkernels._C_cuda over csrc/cuda) against the reference backend.

The GPU tests run only where torch has CUDA, a device is present and the extension is loaded; elsewhere
they skip with the reason. The registration tests always run: every op has a `cuda` implementation with
its `reasons`, and on a machine without it the backend says why it cannot serve instead of failing
obscurely. (The kernels themselves are also checked without a GPU, under a host SIMT emulation, by the
ctest test_cuda_emu; see csrc/cuda/tests.)
"""
from __future__ import annotations

import math

import pytest
import torch

import fwdkernels as fk
from fwdkernels import _ext
from fwdkernels.attention_dual import attention_dual_op
from fwdkernels.lora_linear_dual import lora_linear_dual_op
from fwdkernels.perturb import perturb_op, words_op

HAS_CUDA_BACKEND = bool(torch.cuda.is_available() and _ext.C_CUDA is not None)
if not torch.cuda.is_available():
    _WHY = "torch has no CUDA device here" + ("" if torch.version.cuda else " (a CPU build of torch)")
elif _ext.C_CUDA is None:
    _WHY = f"fwdkernels._C_cuda is not loaded ({_ext.CUDA_LOAD_ERROR or 'not built'})"
else:
    _WHY = ""
needs_cuda_backend = pytest.mark.skipif(not HAS_CUDA_BACKEND, reason=f"cuda backend unavailable: {_WHY}")

OPS = {"perturb": perturb_op, "philox_words": words_op, "lora_linear_dual": lora_linear_dual_op,
       "attention_dual": attention_dual_op}


# ---------------------------------------------------------------------------------------------
# always: registration and the explanation of unavailability

@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_has_a_cuda_impl(name):
    assert "cuda" in OPS[name].impls


def test_cuda_reasons_without_a_gpu_are_about_the_inputs_only():
    # the per-op reasons judge the inputs (dtype, head dim), not the machine
    x64 = torch.zeros(2, 3, dtype=torch.float64)
    assert lora_linear_dual_op.impls["cuda"].reasons(x=x64) == ["supports float32 and bfloat16, not torch.float64"]
    assert lora_linear_dual_op.impls["cuda"].reasons(x=x64.float()) == []
    q = torch.zeros(1, 1, 2, 300)
    assert attention_dual_op.impls["cuda"].reasons(q=q) == ["supports head dim D <= 256, got 300"]
    assert attention_dual_op.impls["cuda"].reasons(q=q[..., :256].bfloat16()) == []
    assert perturb_op.impls["cuda"].reasons(dtype=torch.float16) == ["produces float32 or bfloat16 only, not torch.float16"]


def test_cuda_backend_explains_why_it_is_unavailable():
    why_cpu = fk.available_backends("cpu")["cuda"]
    assert any("runs on CUDA tensors only" in w for w in why_cpu), why_cpu
    if _ext.C_CUDA is None:
        why = fk.available_backends("cuda")["cuda"]
        assert why and "the CUDA extension is not loaded" in why[0], why
        if not torch.version.cuda:
            assert "torch has no CUDA or the CUDA extension was not built" in why[0], why
    # explain() lists the reasons per backend; forcing the backend raises with them
    x = torch.zeros(3, 4)
    assert lora_linear_dual_op.explain("cpu", x=x)["cuda"] == why_cpu
    with pytest.raises(RuntimeError, match="(?s)backend='cuda' cannot serve.*cuda: runs on CUDA tensors only"):
        fk.perturb(1, 8, backend="cuda")
    with pytest.raises(RuntimeError, match="(?s)backend='cuda' cannot serve.*cuda: "):
        fk.lora_linear_dual(x, None, torch.zeros(5, 4), None, None, None, 1.0, torch.tensor([1, 2]),
                            backend="cuda")
    q = torch.zeros(1, 1, 2, 8)
    with pytest.raises(RuntimeError, match="(?s)backend='cuda' cannot serve.*cuda: "):
        fk.attention_dual(q, q, q, backend="cuda")


def test_automatic_choice_on_cpu_never_picks_cuda():
    x = torch.zeros(3, 4)
    assert lora_linear_dual_op.choose("cpu", None, x=x) in ("cpp", "reference")


# ---------------------------------------------------------------------------------------------
# on a GPU: the cuda backend against the reference

DEV = "cuda"


def _close(got, want, dtype, what=""):
    got, want = got.double().cpu(), want.double().cpu()
    rtol, atol = (2e-2, 3e-2) if dtype == torch.bfloat16 else (1e-5, 2e-5)
    scale = max(want.abs().max().item(), 1e-6)
    err = (got - want).abs().max().item()
    assert err <= atol * scale, f"{what}: max |err| {err:.3g} > {atol * scale:.3g}"
    rel = ((got - want).norm() / max(want.norm().item(), 1e-12)).item()
    assert rel <= rtol, f"{what}: relative error {rel:.3g} > {rtol}"


@needs_cuda_backend
@pytest.mark.parametrize("seed,n,offset", [(0, 1, 0), (-424242, 3001, 12345), (99, 70, (1 << 32) - 33),
                                           (7, 3, (1 << 63) - 4)])
def test_words_and_rademacher_bit_identical(seed, n, offset):
    ref = fk.philox_words(seed, n, offset, device=DEV, backend="reference")
    got = fk.philox_words(seed, n, offset, device=DEV, backend="cuda")
    assert got.device.type == "cuda" and got.dtype == torch.int64
    assert torch.equal(got, ref)
    for dtype in (torch.float32, torch.bfloat16):
        r = fk.perturb(seed, n, offset, "rademacher", dtype=dtype, device=DEV, backend="reference")
        assert torch.equal(fk.perturb(seed, n, offset, "rademacher", dtype=dtype, device=DEV, backend="cuda"), r)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normal_close_to_reference(dtype):
    ref = fk.perturb(5, 5000, 17, "normal", dtype=torch.float32, device=DEV, backend="reference")
    got = fk.perturb(5, 5000, 17, "normal", dtype=dtype, device=DEV, backend="cuda")
    # device logf / cosf: a few ulp from the reference's
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert (got.float() - ref).abs().max().item() <= tol * 6
    if dtype == torch.float32:
        assert torch.equal(fk.perturb(5, 5000, 17, "normal", dtype=torch.bfloat16, device=DEV, backend="cuda"),
                           got.to(torch.bfloat16))


@needs_cuda_backend
def test_auto_dispatch_picks_cuda_for_cuda_tensors():
    x = torch.zeros(3, 4, device=DEV)
    assert lora_linear_dual_op.choose(DEV, None, x=x) == "cuda"
    assert attention_dual_op.choose(DEV, None, q=torch.zeros(1, 1, 2, 300, device=DEV)) != "cuda"  # D > 256


@needs_cuda_backend
def test_perturb_combine_binding():
    seeds = torch.tensor([fk.derive_seed(3, j) for j in range(300)], dtype=torch.int64)
    coefs = torch.randn(300)
    coefs[::4] = 0
    want = torch.randn(4097)
    got = want.to(DEV)
    _ext.C_CUDA.perturb_combine(seeds, coefs, 11, 1, got)
    fk.perturb_combine(seeds, coefs, 4097, 11, "normal", out=want)
    _close(got, want, torch.float32, "perturb_combine")


LORA_CASES = [
    # M, d_in, d_out, r, K, x_dot, bias ("none", "frozen", "trainable"), explicit tangents
    (1, 19, 23, 1, 1, True, "trainable", ""),
    (7, 45, 70, 3, 2, False, "frozen", ""),
    (65, 33, 130, 4, 3, True, "trainable", ""),
    (130, 17, 65, 20, 2, True, "none", ""),
    (9, 21, 31, 5, 3, True, "trainable", "ABb"),
    (12, 40, 24, 0, 3, True, "trainable", ""),
    (256, 384, 384, 8, 8, True, "trainable", ""),
]


@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("dist", ["rademacher", "normal"])
@pytest.mark.parametrize("case", LORA_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-{c[6]}-{c[7] or 'seeds'}")
def test_lora_linear_dual_matches_reference(case, dist, dtype):
    M, d_in, d_out, r, K, xdot, bias, expl = case
    g = torch.Generator().manual_seed(M * 1000 + d_in)
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    x, W = rnd(M, d_in), rnd(d_out, d_in) / math.sqrt(d_in)
    x_dot = rnd(K, M, d_in) if xdot else None
    b = rnd(d_out) if bias != "none" else None
    A, B = (rnd(r, d_in), rnd(d_out, r)) if r else (None, None)
    seeds = torch.tensor([fk.derive_seed(77, k) for k in range(K)], dtype=torch.int64)
    kw = {}
    if bias == "trainable":
        kw["offset_bias"] = 2 * r * d_in + 5
    if "A" in expl and r:
        kw["A_dot"] = rnd(K, r, d_in)
    if "B" in expl and r:
        kw["B_dot"] = rnd(K, d_out, r)
    if "b" in expl and bias == "trainable":
        kw["bias_dot"] = rnd(K, d_out)
        kw.pop("offset_bias")
    args = (x, x_dot, W, b, A, B, 0.5, seeds, 3, 3 + r * d_in, dist)
    y_ref, yd_ref = fk.lora_linear_dual(*args, backend="reference", **kw)
    y, yd = fk.lora_linear_dual(*args, backend="cuda", **kw)
    assert y.device.type == "cuda" and y.dtype == dtype and yd.shape == (K, M, d_out)
    _close(y, y_ref, dtype, "y")
    _close(yd, yd_ref, dtype, "y_dot")


@needs_cuda_backend
def test_lora_linear_dual_strided_inputs_and_seeds_on_device():
    x = torch.randn(10, 48, device=DEV)[:, :40]  # a row stride larger than the row
    W = torch.randn(24, 40, device=DEV)
    A, B = torch.randn(4, 40, device=DEV), torch.randn(24, 4, device=DEV).t().contiguous().t()
    seeds = torch.tensor([11, 12, 13], device=DEV)
    args = (x, None, W, None, A, B, 2.0, seeds, 0, 160)
    _close(fk.lora_linear_dual(*args, backend="cuda")[1], fk.lora_linear_dual(*args, backend="reference")[1],
           torch.float32, "y_dot")


ATTN_CASES = [
    # B, H, Hkv, L, S, D, K, tangents, causal, mask
    (1, 1, 1, 1, 1, 1, 1, "qkv", False, None),
    (2, 4, 2, 5, 7, 3, 2, "qkv", False, None),
    (1, 2, 1, 33, 17, 40, 3, "qkv", False, "pad"),
    (1, 1, 1, 9, 70, 100, 5, "qkv", False, None),
    (1, 2, 2, 5, 9, 200, 2, "qk", False, "full"),
    (2, 2, 1, 40, 40, 32, 9, "qkv", True, None),
    (1, 1, 1, 12, 5, 16, 2, "qkv", True, None),
    (1, 3, 3, 6, 11, 8, 3, "v", True, "pad"),
    (2, 8, 2, 128, 160, 64, 8, "qkv", True, "pad"),
]


@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "x".join(map(str, c[:7])) + f"-{c[7]}-{c[8]}-{c[9]}")
def test_attention_dual_matches_reference(case, dtype):
    B, H, Hkv, L, S, D, K, tang, causal, mask = case
    g = torch.Generator().manual_seed(B * 100 + L * 10 + D)
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    q, k, v = rnd(B, H, L, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
    qd = rnd(K, B, H, L, D) if "q" in tang else None
    kd = rnd(K, B, Hkv, S, D) if "k" in tang else None
    vd = rnd(K, B, Hkv, S, D) if "v" in tang else None
    m = None
    if mask == "pad":
        m = torch.ones(B, 1, 1, S, dtype=torch.bool, device=DEV)
        m[-1, ..., S // 2:] = False
    elif mask == "full":
        m = torch.randn(B, H, L, S, generator=g).to(DEV)
        m[0, 0, 0] = float("-inf")  # a row with every key masked: zeros, not NaN
    o_ref, od_ref = fk.attention_dual(q, k, v, qd, kd, vd, attn_mask=m, causal=causal, backend="reference")
    o, od = fk.attention_dual(q, k, v, qd, kd, vd, attn_mask=m, causal=causal, backend="cuda")
    assert o.device.type == "cuda" and o.dtype == dtype
    _close(o, o_ref, dtype, "o")
    _close(od, od_ref, dtype, "o_dot")


@needs_cuda_backend
def test_attention_dual_primal_only():
    q = torch.randn(2, 2, 7, 24, device=DEV)
    o, od = fk.attention_dual(q, q, q, causal=True, backend="cuda")
    assert od is None
    _close(o, fk.attention_dual(q, q, q, causal=True, backend="reference")[0], torch.float32, "o")


@needs_cuda_backend
def test_c_api_errors_surface_as_runtime_errors():
    x = torch.zeros(3, 4, device=DEV)
    with pytest.raises(RuntimeError, match="fwd_cuda_lora_linear_dual: .*offset_A"):
        # a negative offset reaches the C API only through the binding (the public function rejects it)
        _ext.C_CUDA.lora_linear_dual(x, None, torch.zeros(5, 4, device=DEV), None, torch.zeros(2, 4, device=DEV),
                                     torch.zeros(5, 2, device=DEV), 1.0, torch.tensor([1]), 1, -1, 0, -1, 0,
                                     None, None, None)
    q = torch.zeros(1, 1, 2, 300, device=DEV)
    with pytest.raises(RuntimeError, match="fwd_cuda_attention_dual: .*D <= 256"):
        _ext.C_CUDA.attention_dual(q, q, q, None, None, None, None, False, 1.0, 0)


@needs_cuda_backend
def test_opcheck_cuda():
    x, W = torch.randn(5, 8, device=DEV), torch.randn(6, 8, device=DEV)
    A, B = torch.randn(2, 8, device=DEV), torch.randn(6, 2, device=DEV)
    seeds = torch.tensor([1, 2, 3], device=DEV)
    torch.library.opcheck(torch.ops.fwdkernels.lora_linear_dual.default,
                          (x, None, W, None, A, B, 1.0, seeds, 3, 0, 16, -1, "normal", None, None, None, "cuda"),
                          test_utils=("test_schema", "test_faketensor"))
