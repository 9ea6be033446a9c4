"""The fused dual LoRA linear: primal output and K tangent streams in one call.

    y        = x W^T + b + s (x A^T) B^T
    y_dot[k] = x_dot[k] W^T + s [(x_dot[k] A^T + x V_A[k]^T) B^T + (x A^T) V_B[k]^T] + V_b[k]

V_A[k] (r, d_in), V_B[k] (d_out, r) and V_b[k] (d_out,) are perturbation k's slices of lora_A,
lora_B and a trainable bias, i.e. ``perturb(seeds[k], numel, offset)`` reshaped row-major, at the
parameters' offsets in the flattened trainable vector. The cpp and triton backends regenerate them
inside the kernel (cpp: while packing GEMM panels; triton: in registers per tile) and never
materialise them as tensors; the weight is read by one GEMM over the primal rows and all K*M tangent
rows together. Explicit tangents (A_dot (K, r, d_in), B_dot (K, d_out, r), bias_dot (K, d_out)) can
replace the seeds for drop-in jvp use. Without lora_A/lora_B it is the dual of a frozen linear (with
an optional BitFit-trainable bias).
"""
from __future__ import annotations

import torch

from . import _ext
from .backends import Op, kernel_dtype_reasons
from .perturb import DISTS, interpreter_bf16_reasons, perturb

lora_linear_dual_op = Op("lora_linear_dual")


# ---------------------------------------------------------------------------------------------
# reference (pure torch; float64 capable)

def _slices(seeds, K, numel, offset, dist, dtype, device, explicit, shape):
    if explicit is not None:
        return explicit.to(dtype)
    return torch.stack([perturb(int(seeds[k]), numel, offset, dist, torch.float32, device, backend="reference")
                        for k in range(K)]).reshape(K, *shape).to(dtype)


@lora_linear_dual_op.register("reference")
def _reference(x, x_dot, weight, bias, lora_A, lora_B, scaling, seeds, K, offset_A, offset_B, offset_bias, dist,
               A_dot, B_dot, bias_dot):
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    M, d_in = x.shape
    d_out = weight.shape[0]
    xc, wc = x.to(ct), weight.to(ct)
    y = xc @ wc.T
    y_dot = (x_dot.to(ct) @ wc.T) if x_dot is not None else torch.zeros(K, M, d_out, dtype=ct, device=x.device)
    if bias is not None:
        y = y + bias.to(ct)
    if bias_dot is not None or offset_bias >= 0:
        vb = _slices(seeds, K, d_out, offset_bias, dist, ct, x.device, bias_dot, (d_out,))
        y_dot = y_dot + vb[:, None, :]
    if lora_A is not None:
        r = lora_A.shape[0]
        A, B = lora_A.to(ct), lora_B.to(ct)
        va = _slices(seeds, K, r * d_in, offset_A, dist, ct, x.device, A_dot, (r, d_in))
        vb = _slices(seeds, K, d_out * r, offset_B, dist, ct, x.device, B_dot, (d_out, r))
        h = xc @ A.T  # (M, r)
        y = y + scaling * (h @ B.T)
        u = torch.einsum("mi,kri->kmr", xc, va)
        if x_dot is not None:
            u = u + x_dot.to(ct) @ A.T
        y_dot = y_dot + scaling * (u @ B.T + torch.einsum("mr,kor->kmo", h, vb))
    return y.to(x.dtype), y_dot.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# cpp

def _cpp_reasons(x=None, **_):
    return kernel_dtype_reasons(x.dtype)


@lora_linear_dual_op.register("cpp", _cpp_reasons)
def _cpp(x, x_dot, weight, bias, lora_A, lora_B, scaling, seeds, K, offset_A, offset_B, offset_bias, dist, A_dot,
         B_dot, bias_dot):
    return _ext.C.lora_linear_dual(x, x_dot, weight, bias, lora_A, lora_B, float(scaling), seeds, K, offset_A,
                                   offset_B, offset_bias, DISTS[dist], A_dot, B_dot, bias_dot, True)


def _cpp_tangents(x, x_dot, weight, bias, lora_A, lora_B, scaling, seeds, K, offset_A, offset_B, offset_bias, dist,
                  A_dot, B_dot, bias_dot):
    """The cpp kernel without the primal rows (y is (0, d_out))."""
    return _ext.C.lora_linear_dual(x, x_dot, weight, bias, lora_A, lora_B, float(scaling), seeds, K, offset_A,
                                   offset_B, offset_bias, DISTS[dist], A_dot, B_dot, bias_dot, False)


# ---------------------------------------------------------------------------------------------
# cuda (csrc/cuda: tiled GEMMs with the perturbation slices regenerated per tile; seeds may be on the CPU)

@lora_linear_dual_op.register("cuda", _cpp_reasons)
def _cuda(x, x_dot, weight, bias, lora_A, lora_B, scaling, seeds, K, offset_A, offset_B, offset_bias, dist, A_dot,
          B_dot, bias_dot):
    return _ext.C_CUDA.lora_linear_dual(x, x_dot, weight, bias, lora_A, lora_B, float(scaling), seeds, K, offset_A,
                                        offset_B, offset_bias, DISTS[dist], A_dot, B_dot, bias_dot)


# ---------------------------------------------------------------------------------------------
# triton

_KERNELS = None


def _triton_kernels():
    # Triton resolves the jit helpers a kernel calls through the module's globals, hence `global _gen`;
    # Triton itself is imported only here, on first use, so that the package imports without it.
    global _KERNELS, _gen
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def _gen(seed, offs, DIST: tl.constexpr):
        # Perturbation values at int64 global offsets `offs` (see perturb.py): identical words to cpp.
        if DIST == 0:
            w = tl.randint(seed, offs)
            v = 1.0 - 2.0 * (w >> 31).to(tl.float32)
        else:
            v = tl.randn(seed, offs)
        return v

    @triton.jit
    def down_kernel(x_ptr, xd_ptr, a_ptr, ad_ptr, seeds_ptr, hs_ptr, us_ptr, M, D_IN, R, scaling, offset_A,
                    HAS_XDOT: tl.constexpr, HAS_ADOT: tl.constexpr, DIST: tl.constexpr, IEEE: tl.constexpr,
                    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        # Program (m-block, g): g = 0 computes s*h = s*x A^T; g = 1+k computes s*u_k = s*(x_dot_k A^T + x V_A,k^T),
        # with V_A,k generated per (BR, BK) tile from seed k.
        pid_m = tl.program_id(0)
        g = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rr = tl.arange(0, BR)
        m_ok = rm < M
        r_ok = rr < R
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for p0 in range(0, D_IN, BK):
            rk = p0 + tl.arange(0, BK)
            k_ok = rk < D_IN
            xt = tl.load(x_ptr + rm[:, None].to(tl.int64) * D_IN + rk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0)
            at = tl.load(a_ptr + rr[:, None] * D_IN + rk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            if g == 0:
                acc += tl.dot(xt, tl.trans(at), input_precision="ieee" if IEEE else "tf32")
            else:
                k = g - 1
                if HAS_XDOT:
                    xdt = tl.load(xd_ptr + (k * M + rm[:, None]).to(tl.int64) * D_IN + rk[None, :],
                                  mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                    acc += tl.dot(xdt, tl.trans(at), input_precision="ieee" if IEEE else "tf32")
                if HAS_ADOT:
                    vt = tl.load(ad_ptr + (k * R + rr[:, None]).to(tl.int64) * D_IN + rk[None, :],
                                 mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                else:
                    seed = tl.load(seeds_ptr + k)
                    offs = offset_A + rr[:, None].to(tl.int64) * D_IN + rk[None, :]
                    vt = _gen(seed, offs, DIST)
                    vt = tl.where(r_ok[:, None] & k_ok[None, :], vt, 0.0).to(xt.dtype)
                acc += tl.dot(xt, tl.trans(vt), input_precision="ieee" if IEEE else "tf32")
        acc = acc * scaling
        out_mask = m_ok[:, None] & r_ok[None, :]
        if g == 0:
            tl.store(hs_ptr + rm[:, None] * R + rr[None, :], acc, mask=out_mask)
        else:
            tl.store(us_ptr + ((g - 1) * M + rm[:, None]).to(tl.int64) * R + rr[None, :], acc, mask=out_mask)

    @triton.jit
    def main_kernel(x_ptr, xd_ptr, w_ptr, bias_ptr, b_ptr, bd_ptr, biasd_ptr, seeds_ptr, hs_ptr, us_ptr, y_ptr,
                    yd_ptr, M, D_IN, D_OUT, R, K, offset_B, offset_bias,
                    HAS_XDOT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                    HAS_BDOT: tl.constexpr, BIAS_TRAIN: tl.constexpr, HAS_BIASDOT: tl.constexpr,
                    DIST: tl.constexpr, IEEE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        # One program = one (BM, BN) output tile of one row group g (0: primal, 1+k: tangent k). g varies
        # fastest over consecutive programs, so the K+1 programs sharing a W tile run together and read it
        # from L2 once it is there.
        pid = tl.program_id(0)
        G = K + 1
        g = pid % G
        rest = pid // G
        n_m = tl.cdiv(M, BM)
        pid_m = rest % n_m
        pid_n = rest // n_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        m_ok = rm < M
        n_ok = rn < D_OUT
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if g == 0 or HAS_XDOT:
            if g == 0:
                src = x_ptr
            else:
                src = xd_ptr + (g - 1).to(tl.int64) * M * D_IN
            for p0 in range(0, D_IN, BK):
                rk = p0 + tl.arange(0, BK)
                k_ok = rk < D_IN
                at = tl.load(src + rm[:, None].to(tl.int64) * D_IN + rk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                             other=0.0)
                wt = tl.load(w_ptr + rn[:, None].to(tl.int64) * D_IN + rk[None, :],
                             mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc += tl.dot(at, tl.trans(wt), input_precision="ieee" if IEEE else "tf32")
        if HAS_LORA:
            rr = tl.arange(0, BR)
            r_ok = rr < R
            hst = tl.load(hs_ptr + rm[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            bt = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=n_ok[:, None] & r_ok[None, :],
                         other=0.0).to(tl.float32)
            if g == 0:
                acc += tl.dot(hst, tl.trans(bt), input_precision="ieee")
            else:
                k = g - 1
                ut = tl.load(us_ptr + (k * M + rm[:, None]).to(tl.int64) * R + rr[None, :],
                             mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                acc += tl.dot(ut, tl.trans(bt), input_precision="ieee")
                if HAS_BDOT:
                    vb = tl.load(bd_ptr + (k * D_OUT + rn[:, None]).to(tl.int64) * R + rr[None, :],
                                 mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
                else:
                    seed = tl.load(seeds_ptr + k)
                    vb = _gen(seed, offset_B + rn[:, None].to(tl.int64) * R + rr[None, :], DIST)
                    vb = tl.where(n_ok[:, None] & r_ok[None, :], vb, 0.0)
                acc += tl.dot(hst, tl.trans(vb), input_precision="ieee")
        if g == 0:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            dst = y_ptr
        else:
            if BIAS_TRAIN:
                if HAS_BIASDOT:
                    vbias = tl.load(biasd_ptr + (g - 1) * D_OUT + rn, mask=n_ok, other=0.0).to(tl.float32)
                else:
                    seed = tl.load(seeds_ptr + g - 1)
                    vbias = _gen(seed, offset_bias + rn.to(tl.int64), DIST)
                acc += vbias[None, :]
            dst = yd_ptr + (g - 1).to(tl.int64) * M * D_OUT
        tl.store(dst + rm[:, None].to(tl.int64) * D_OUT + rn[None, :], acc.to(dst.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    _KERNELS = (down_kernel, main_kernel, triton)
    return _KERNELS


def _triton_reasons(x=None, **_):
    return kernel_dtype_reasons(x.dtype) or interpreter_bf16_reasons(x.dtype, x.device)


@lora_linear_dual_op.register("triton", _triton_reasons)
def _triton(x, x_dot, weight, bias, lora_A, lora_B, scaling, seeds, K, offset_A, offset_B, offset_bias, dist, A_dot,
            B_dot, bias_dot):
    down_kernel, main_kernel, triton = _triton_kernels()
    dev = x.device
    M, d_in = x.shape
    d_out = weight.shape[0]
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    x, x_dot, weight, bias, lora_A, lora_B = map(c, (x, x_dot, weight, bias, lora_A, lora_B))
    A_dot, B_dot, bias_dot = map(c, (A_dot, B_dot, bias_dot))
    if seeds is not None:
        seeds = seeds.to(dev).contiguous()
    dummy = torch.empty(1, dtype=x.dtype, device=dev)
    ieee = x.dtype != torch.float32 or not torch.backends.cuda.matmul.allow_tf32 or dev.type != "cuda"
    interp = dev.type == "cpu"
    has_lora = lora_A is not None
    r = lora_A.shape[0] if has_lora else 1
    BR = max(16, triton.next_power_of_2(r))
    seeds_arg = seeds if seeds is not None else torch.zeros(1, dtype=torch.int64, device=dev)
    f32 = torch.float32
    hs = torch.empty((M, r), dtype=f32, device=dev) if has_lora else torch.empty(1, dtype=f32, device=dev)
    us = torch.empty((K, M, r), dtype=f32, device=dev) if has_lora else hs
    if has_lora:
        BM, BK = (16, 32) if interp else (64, 64)
        down_kernel[(triton.cdiv(M, BM), K + 1)](
            x, x_dot if x_dot is not None else dummy, lora_A, A_dot if A_dot is not None else dummy, seeds_arg,
            hs, us, M, d_in, r, float(scaling), offset_A,
            HAS_XDOT=x_dot is not None, HAS_ADOT=A_dot is not None, DIST=DISTS[dist], IEEE=ieee,
            BM=BM, BK=BK, BR=BR)
    y = torch.empty((M, d_out), dtype=x.dtype, device=dev)
    y_dot = torch.empty((K, M, d_out), dtype=x.dtype, device=dev)
    BM, BN, BK = (16, 32, 32) if interp else (128, 128, 32)
    grid = (triton.cdiv(M, BM) * triton.cdiv(d_out, BN) * (K + 1),)
    main_kernel[grid](
        x, x_dot if x_dot is not None else dummy, weight, bias if bias is not None else dummy,
        lora_B if has_lora else dummy, B_dot if B_dot is not None else dummy,
        bias_dot if bias_dot is not None else dummy, seeds_arg, hs, us, y, y_dot,
        M, d_in, d_out, r, K, offset_B, offset_bias,
        HAS_XDOT=x_dot is not None, HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_BDOT=B_dot is not None,
        BIAS_TRAIN=bias_dot is not None or offset_bias >= 0, HAS_BIASDOT=bias_dot is not None,
        DIST=DISTS[dist], IEEE=ieee, BM=BM, BN=BN, BK=BK, BR=BR,
        **({} if interp else {"num_warps": 8, "num_stages": 3}))
    return y, y_dot


# ---------------------------------------------------------------------------------------------
# op registration and the public function

@torch.library.custom_op("fwdkernels::lora_linear_dual", mutates_args=())
def _lora_linear_dual_custom(x: torch.Tensor, x_dot: torch.Tensor | None, weight: torch.Tensor,
                             bias: torch.Tensor | None, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                             scaling: float, seeds: torch.Tensor | None, K: int, offset_A: int, offset_B: int,
                             offset_bias: int, dist: str, A_dot: torch.Tensor | None, B_dot: torch.Tensor | None,
                             bias_dot: torch.Tensor | None, backend: str,
                             primal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    args = (x, x_dot, weight, bias, lora_A, lora_B, scaling, seeds, K, offset_A, offset_B, offset_bias, dist, A_dot,
            B_dot, bias_dot)
    if not primal and backend == "cpp":
        return _cpp_tangents(*args)
    y, y_dot = lora_linear_dual_op.impl(backend)(*args)
    # backends without a tangents-only path compute the primal and drop it
    return (y if primal else y.new_empty((0, y.shape[1]))), y_dot


@_lora_linear_dual_custom.register_fake
def _(x, x_dot, weight, bias, lora_A, lora_B, scaling, seeds, K, offset_A, offset_B, offset_bias, dist, A_dot,
      B_dot, bias_dot, backend, primal=True):
    M, d_out = x.shape[0], weight.shape[0]
    return x.new_empty((M if primal else 0, d_out)), x.new_empty((K, M, d_out))


def _shape_err(name, t, want):
    return ValueError(f"lora_linear_dual: {name} must have shape {want}, got {tuple(t.shape)}")


def lora_linear_dual(x, x_dot, weight, bias, lora_A, lora_B, scaling, seeds, offset_A=0, offset_B=0,
                     dist="rademacher", backend=None, *, offset_bias=None, A_dot=None, B_dot=None, bias_dot=None,
                     primal=True):
    """Dual of ``y = x W^T + b + s (x A^T) B^T`` for K perturbations.

    Args:
        x: (..., d_in) primal input (leading dims flattened to M rows).
        x_dot: (K, ..., d_in) incoming tangents, or None (no tangent reaches this layer).
        weight: (d_out, d_in), frozen.  bias: (d_out,) or None.
        lora_A: (r, d_in) and lora_B: (d_out, r), or both None (a frozen linear).
        scaling: the LoRA scale s (alpha / r).
        seeds: (K,) int64 tensor of perturbation seeds, or None when every trainable slice has an explicit
            tangent (then K comes from the tangents).
        offset_A, offset_B: offsets of lora_A / lora_B in the flattened trainable vector.
        dist: "rademacher" or "normal".
        backend: None (auto), "reference", "cpp", "triton" or "cuda".
        offset_bias: offset of a trainable (BitFit) bias, or None if the bias is frozen.
        A_dot (K, r, d_in), B_dot (K, d_out, r), bias_dot (K, d_out): explicit tangents instead of seeds.
        primal: False returns (None, y_dot) and the cpp backend skips the primal rows (for a caller that
            already holds y: the tangents of a row subset computed later).

    Returns:
        (y, y_dot): y (..., d_out) (None when primal=False), y_dot (K, ..., d_out), in x's dtype (float32
        accumulation).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("lora_linear_dual: x and weight must be tensors")
    if x.dim() < 1:
        raise ValueError("lora_linear_dual: x must have at least one dimension (..., d_in)")
    if weight.dim() != 2:
        raise _shape_err("weight", weight, "(d_out, d_in)")
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"lora_linear_dual: x has {x.shape[-1]} features but weight expects d_in={d_in}")
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, d_in)
    M = x2.shape[0]
    if M == 0:
        raise ValueError("lora_linear_dual: x has no rows (M = 0)")
    if dist not in DISTS:
        raise ValueError(f"lora_linear_dual: dist must be one of {tuple(DISTS)}, got {dist!r}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_linear_dual: lora_A and lora_B must be given together (or both None)")
    # K from seeds or explicit tangents
    K = None
    if seeds is not None:
        if not isinstance(seeds, torch.Tensor):
            raise TypeError(f"lora_linear_dual: seeds must be an int64 tensor of shape (K,), got {type(seeds).__name__}")
        if seeds.dtype != torch.int64:
            raise TypeError(f"lora_linear_dual: seeds must be int64, got {seeds.dtype}")
        if seeds.dim() != 1:
            raise _shape_err("seeds", seeds, "(K,)")
        K = seeds.shape[0]
    for name, t in (("x_dot", x_dot), ("A_dot", A_dot), ("B_dot", B_dot), ("bias_dot", bias_dot)):
        if t is not None:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"lora_linear_dual: {name} must be a tensor")
            if K is None:
                K = t.shape[0] if t.dim() > 0 else 0
            elif t.dim() == 0 or t.shape[0] != K:
                raise ValueError(f"lora_linear_dual: {name} has {t.shape[0] if t.dim() else 0} tangents but K={K}")
    if K is None:
        raise ValueError("lora_linear_dual: K is unknown: pass seeds (K,) or tangent tensors")
    if K <= 0:
        raise ValueError("lora_linear_dual: K (the number of perturbations) must be at least 1, got 0")
    dev = x.device
    tensors = {"x": x, "x_dot": x_dot, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B,
               "A_dot": A_dot, "B_dot": B_dot, "bias_dot": bias_dot}
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device != dev:
            raise ValueError(f"lora_linear_dual: {name} is on {t.device} but x is on {dev}")
        if t.dtype != x.dtype:
            raise TypeError(f"lora_linear_dual: {name} has dtype {t.dtype} but x has {x.dtype}; "
                            "all inputs must share one dtype")
    if not x.dtype.is_floating_point:
        raise TypeError(f"lora_linear_dual: x must be floating point, got {x.dtype}")
    if x_dot is not None:
        if tuple(x_dot.shape) != (K, *x.shape):
            raise _shape_err("x_dot", x_dot, (K, *x.shape))
        x_dot = x_dot.reshape(K, M, d_in)
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise _shape_err("bias", bias, (d_out,))
    r = 0
    if lora_A is not None:
        if lora_A.dim() != 2 or lora_A.shape[1] != d_in:
            raise _shape_err("lora_A", lora_A, ("r", d_in))
        r = lora_A.shape[0]
        if r == 0:
            raise ValueError("lora_linear_dual: LoRA rank r must be at least 1")
        if tuple(lora_B.shape) != (d_out, r):
            raise _shape_err("lora_B", lora_B, (d_out, r))
        if A_dot is not None and tuple(A_dot.shape) != (K, r, d_in):
            raise _shape_err("A_dot", A_dot, (K, r, d_in))
        if B_dot is not None and tuple(B_dot.shape) != (K, d_out, r):
            raise _shape_err("B_dot", B_dot, (K, d_out, r))
    elif A_dot is not None or B_dot is not None:
        raise ValueError("lora_linear_dual: A_dot/B_dot given without lora_A/lora_B")
    if bias_dot is not None:
        if bias is None:
            raise ValueError("lora_linear_dual: bias_dot given but bias is None")
        if tuple(bias_dot.shape) != (K, d_out):
            raise _shape_err("bias_dot", bias_dot, (K, d_out))
    if offset_bias is not None and bias is None:
        raise ValueError("lora_linear_dual: offset_bias given but bias is None")
    for name, off in (("offset_A", offset_A), ("offset_B", offset_B), ("offset_bias", offset_bias)):
        if off is None:
            continue
        if not isinstance(off, int) or isinstance(off, bool):
            raise TypeError(f"lora_linear_dual: {name} must be an int, got {type(off).__name__}")
        if off < 0:
            raise ValueError(f"lora_linear_dual: {name} must be non-negative, got {off}")
    needs_seeds = (lora_A is not None and (A_dot is None or B_dot is None)) or (
        offset_bias is not None and bias_dot is None)
    if needs_seeds and seeds is None:
        raise ValueError("lora_linear_dual: seeds are required to regenerate perturbation slices "
                         "(or pass A_dot/B_dot/bias_dot)")
    if seeds is not None and seeds.device.type != "cpu" and seeds.device != dev:
        raise ValueError(f"lora_linear_dual: seeds are on {seeds.device} but x is on {dev}")
    scaling = float(scaling)
    ob = -1 if offset_bias is None or bias_dot is not None else int(offset_bias)
    if bias_dot is not None:
        ob = -1
    b = lora_linear_dual_op.choose(dev, backend, x=x2)
    if b == "cpp" and seeds is not None and seeds.device.type != "cpu":
        seeds = seeds.cpu()
    y, y_dot = torch.ops.fwdkernels.lora_linear_dual(
        x2, x_dot, weight, bias, lora_A, lora_B, scaling, seeds, K, int(offset_A), int(offset_B), ob, dist,
        A_dot, B_dot, bias_dot, b, bool(primal))
    return (y.reshape(*lead, d_out) if primal else None), y_dot.reshape(K, *lead, d_out)
