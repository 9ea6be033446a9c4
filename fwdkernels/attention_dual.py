"""The fused dual (forward-mode) attention: primal output and K tangent streams in one pass.

Per batch b, query head h and query row i (grouped-query attention: query head h reads kv head
h // (H // Hkv)), with scores s_j = scale q·k_j + mask_ij, tangent scores ṡ_j = scale (q̇·k_j + q·k̇_j)
and p = softmax(s):

    o  = Σ_j p_j v_j
    ȯ  = Σ_j p_j (ṡ_j v_j + v̇_j) − (Σ_j p_j ṡ_j) · o          (one ȯ per tangent stream k)

The cpp and triton backends compute it flash style in one pass over the keys (see
../shared/docs/method.md, "Dual attention, one pass"): running max m, l = Σ e^(s_j−m),
a = Σ e^(s_j−m) v_j and per tangent stream b = Σ e^(s_j−m)(ṡ_j v_j + v̇_j), c = Σ e^(s_j−m) ṡ_j, all
rescaled when m grows; o = a/l, ȯ = b/l − (c/l)·o. The K streams share the primal scores and every K/V
tile load; no (L, S) score matrix is formed per tangent (nor for the primal). The reference backend is
plain torch and does materialise the scores.

Masking: ``attn_mask`` is additive (float) or boolean (True = attend, as in torch SDPA), broadcastable to
(B, H, L, S); ``causal=True`` further restricts query i to keys j <= i + (S − L) (bottom-right aligned, as
Hugging Face does for S > L). A query row whose every key is masked gets o = 0 and ȯ = 0 (torch's
softmax would give NaN there).
"""
from __future__ import annotations

import math

import torch

from . import _ext
from .backends import Op, kernel_dtype_reasons
from .perturb import interpreter_bf16_reasons

attention_dual_op = Op("attention_dual")

_TRITON_MAX_D = 256


def _additive_mask(attn_mask, dtype):
    """attn_mask (bool: True = attend, or additive float) as an additive mask of ``dtype`` (unexpanded)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=attn_mask.device)
        return torch.where(attn_mask, zero, torch.full((), float("-inf"), dtype=dtype, device=attn_mask.device))
    return attn_mask.to(dtype)


# ---------------------------------------------------------------------------------------------
# reference (pure torch; float64 capable; materialises the (K, B, H, L, S) tangent scores)

@attention_dual_op.register("reference")
def _reference(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, scale, K):
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    qc = q.to(ct)
    kc = k.to(ct).repeat_interleave(G, dim=1)
    vc = v.to(ct).repeat_interleave(G, dim=1)
    s = (qc @ kc.transpose(-1, -2)) * scale  # (B, H, L, S)
    m = _additive_mask(attn_mask, ct)
    if m is not None:
        s = s + m
    if causal:
        i = torch.arange(L, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        s = s.masked_fill(j > i + (S - L), float("-inf"))
    mx = s.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))  # fully masked rows: e = 0, not NaN
    e = torch.exp(s - mx)
    l = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(l > 0, l, torch.ones_like(l))  # fully masked rows: p = 0, so o = ȯ = 0
    o = p @ vc
    if K == 0:
        return o.to(q.dtype), q.new_empty((0, B, H, L, D))
    od = torch.zeros((K, B, H, L, D), dtype=ct, device=q.device)
    if q_dot is not None or k_dot is not None:
        sd = torch.zeros((K, B, H, L, S), dtype=ct, device=q.device)
        if q_dot is not None:
            sd = sd + q_dot.to(ct) @ kc.transpose(-1, -2)
        if k_dot is not None:
            sd = sd + qc @ k_dot.to(ct).repeat_interleave(G, dim=2).transpose(-1, -2)
        w = p * (sd * scale)
        od = od + w @ vc - w.sum(dim=-1, keepdim=True) * o
    if v_dot is not None:
        od = od + p @ v_dot.to(ct).repeat_interleave(G, dim=2)
    return o.to(q.dtype), od.to(q.dtype)


# ---------------------------------------------------------------------------------------------
# cpp

def _cpp_reasons(q=None, **_):
    return kernel_dtype_reasons(q.dtype)


@attention_dual_op.register("cpp", _cpp_reasons)
def _cpp(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, scale, K):
    return _ext.C.attention_dual(q, k, v, q_dot, k_dot, v_dot, attn_mask, bool(causal), float(scale), int(K))


# ---------------------------------------------------------------------------------------------
# cuda (csrc/cuda: one block per (b, h, query block, chunk of tangent streams); head dim <= 256)

_CUDA_MAX_D = 256


def _cuda_reasons(q=None, **_):
    why = kernel_dtype_reasons(q.dtype)
    if why:
        return why
    if q.shape[-1] > _CUDA_MAX_D:
        return [f"supports head dim D <= {_CUDA_MAX_D}, got {q.shape[-1]}"]
    return []


@attention_dual_op.register("cuda", _cuda_reasons)
def _cuda(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, scale, K):
    return _ext.C_CUDA.attention_dual(q, k, v, q_dot, k_dot, v_dot, attn_mask, bool(causal), float(scale), int(K))


# ---------------------------------------------------------------------------------------------
# triton

_KERNELS = None


def _triton_kernels():
    # Triton itself is imported only here, on first use, so that the package imports without it.
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def attn_dual_kernel(q_ptr, k_ptr, v_ptr, qd_ptr, kd_ptr, vd_ptr, mask_ptr, o_ptr, od_ptr, bacc_ptr, cacc_ptr,
                         sm_b, sm_h, sm_l, sm_s, H, HKV, L, S, D, K, scale, SQ, SKV, SC,
                         HAS_QD: tl.constexpr, HAS_KD: tl.constexpr, HAS_VD: tl.constexpr,
                         HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        # Program (query block, b*H + h). Loop over key blocks; per block the primal update, then the K
        # tangent streams one after the other, each reusing the loaded k / v tiles. The per-stream
        # accumulators b (BM, BD) and c (BM,) live in float32 scratch (bacc: K*B*H*L*D, cacc: K*B*H*L),
        # read, rescaled, updated and written back per key block by this program only (a register copy
        # for every stream would not fit for realistic K). SQ / SKV / SC: elements per tangent stream of
        # q_dot / o_dot, of k_dot / v_dot and of cacc.
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // (H // HKV)
        rm = pid_m * BM + tl.arange(0, BM)
        rd = tl.arange(0, BD)
        m_ok = rm < L
        d_ok = rd < D
        qmask = m_ok[:, None] & d_ok[None, :]
        q_off = bh.to(tl.int64) * L * D + rm[:, None] * D + rd[None, :]  # (BM, BD) offsets in q / o (stream 0)
        c_off = bh.to(tl.int64) * L + rm  # (BM,) offsets in cacc (stream 0)
        kv_base = (b * HKV + hk).to(tl.int64) * S * D
        q = tl.load(q_ptr + q_off, mask=qmask, other=0.0)
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, BD), tl.float32)
        hi = S
        if CAUSAL:
            hi = tl.minimum(S, (pid_m + 1) * BM + S - L)
        for n0 in range(0, hi, BN):
            rn = n0 + tl.arange(0, BN)
            n_ok = rn < S
            kv_off = kv_base + rn[:, None] * D + rd[None, :]
            kvmask = n_ok[:, None] & d_ok[None, :]
            kt = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0)
            vt = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision="ieee" if IEEE else "tf32") * scale
            if HAS_MASK:
                mk = tl.load(mask_ptr + b.to(tl.int64) * sm_b + h.to(tl.int64) * sm_h + rm[:, None].to(tl.int64) * sm_l
                             + rn[None, :].to(tl.int64) * sm_s, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
                s = s + mk
            valid = n_ok[None, :] & m_ok[:, None]
            if CAUSAL:
                valid = valid & (rn[None, :] <= rm[:, None] + (S - L))
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # every key so far masked: p = 0, not NaN
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee" if IEEE else "tf32")
            m_i = m_new
            later = n0 > 0  # not the first key block
            # stream pointers advance by one stream per iteration (pointer arithmetic: no int32 overflow)
            b_ptrs = bacc_ptr + q_off
            c_ptrs = cacc_ptr + c_off
            qd_ptrs = qd_ptr + q_off
            kd_ptrs = kd_ptr + kv_off
            vd_ptrs = vd_ptr + kv_off
            for kk in range(K):
                # b, c of stream kk: zero before the first key block (masked load), then read back
                bt = tl.load(b_ptrs, mask=qmask & later, other=0.0) * alpha[:, None]
                if HAS_QD or HAS_KD:
                    sd = tl.zeros((BM, BN), tl.float32)
                    if HAS_QD:
                        qdt = tl.load(qd_ptrs, mask=qmask, other=0.0)
                        sd += tl.dot(qdt, tl.trans(kt), input_precision="ieee" if IEEE else "tf32")
                    if HAS_KD:
                        kdt = tl.load(kd_ptrs, mask=kvmask, other=0.0)
                        sd += tl.dot(q, tl.trans(kdt), input_precision="ieee" if IEEE else "tf32")
                    w = p * (sd * scale)
                    ct = tl.load(c_ptrs, mask=m_ok & later, other=0.0) * alpha + tl.sum(w, 1)
                    tl.store(c_ptrs, ct, mask=m_ok)
                    bt += tl.dot(w.to(vt.dtype), vt, input_precision="ieee" if IEEE else "tf32")
                if HAS_VD:
                    vdt = tl.load(vd_ptrs, mask=kvmask, other=0.0)
                    bt += tl.dot(p.to(vdt.dtype), vdt, input_precision="ieee" if IEEE else "tf32")
                tl.store(b_ptrs, bt, mask=qmask)
                b_ptrs += SQ
                c_ptrs += SC
                qd_ptrs += SQ
                kd_ptrs += SKV
                vd_ptrs += SKV
        tl.debug_barrier()
        # o = a / l, o_dot = b / l - (c / l) o; l == 0 (every key masked) gives zeros
        inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
        o = acc * inv[:, None]
        tl.store(o_ptr + q_off, o.to(o_ptr.dtype.element_ty), mask=qmask)
        ran = (rm * 0 + hi) > 0  # (BM,); false when no key block ran and the scratch was never written
        b_ptrs = bacc_ptr + q_off
        c_ptrs = cacc_ptr + c_off
        od_ptrs = od_ptr + q_off
        for kk in range(K):
            bt = tl.load(b_ptrs, mask=qmask & ran[:, None], other=0.0)
            od = bt * inv[:, None]
            if HAS_QD or HAS_KD:
                ct = tl.load(c_ptrs, mask=m_ok & ran, other=0.0)
                od = od - (ct * inv)[:, None] * o
            tl.store(od_ptrs, od.to(od_ptr.dtype.element_ty), mask=qmask)
            b_ptrs += SQ
            c_ptrs += SC
            od_ptrs += SQ

    _KERNELS = (attn_dual_kernel, triton)
    return _KERNELS


def _triton_reasons(q=None, **_):
    why = kernel_dtype_reasons(q.dtype)
    if why:
        return why
    if q.shape[-1] > _TRITON_MAX_D:
        return [f"supports head dim D <= {_TRITON_MAX_D}, got {q.shape[-1]}"]
    return interpreter_bf16_reasons(q.dtype, q.device)


@attention_dual_op.register("triton", _triton_reasons)
def _triton(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, scale, K):
    kern, triton = _triton_kernels()
    dev = q.device
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    q, k, v, q_dot, k_dot, v_dot = map(c, (q, k, v, q_dot, k_dot, v_dot))
    o = torch.empty((B, H, L, D), dtype=q.dtype, device=dev)
    od = torch.empty((K, B, H, L, D), dtype=q.dtype, device=dev)
    f32 = torch.float32
    dummy = torch.empty(1, dtype=q.dtype, device=dev)
    # scratch for the per-stream accumulators: o_dot itself when it is float32 (the final pass reads b
    # back and overwrites it with o_dot in place), else a float32 buffer
    bacc = od if q.dtype == f32 else torch.empty((K, B, H, L, D), dtype=f32, device=dev)
    cacc = torch.empty((max(K, 1), B, H, L), dtype=f32, device=dev)
    m = _additive_mask(attn_mask, f32)
    if m is not None:
        m = m.to(dev).expand(B, H, L, S)
        ms = [0 if m.shape[i] == 1 else m.stride(i) for i in range(4)]
    else:
        m = torch.empty(1, dtype=f32, device=dev)
        ms = [0, 0, 0, 0]
    interp = dev.type == "cpu"
    ieee = q.dtype != f32 or not torch.backends.cuda.matmul.allow_tf32 or dev.type != "cuda"
    BD = max(16, triton.next_power_of_2(D))
    if interp:
        BM, BN = 16, 16
    else:
        BM, BN = (64, 64) if BD <= 64 else (64, 32) if BD <= 128 else (32, 32)
    grid = (triton.cdiv(L, BM), B * H)
    kern[grid](q, k, v, q_dot if q_dot is not None else dummy, k_dot if k_dot is not None else dummy,
               v_dot if v_dot is not None else dummy, m, o, od if K > 0 else dummy,
               bacc if K > 0 else torch.empty(1, dtype=f32, device=dev), cacc, *ms, H, Hkv, L, S, D, K,
               float(scale), B * H * L * D, B * Hkv * S * D, B * H * L,
               HAS_QD=q_dot is not None, HAS_KD=k_dot is not None, HAS_VD=v_dot is not None,
               HAS_MASK=attn_mask is not None, CAUSAL=bool(causal), IEEE=ieee, BM=BM, BN=BN, BD=BD,
               **({} if interp else {"num_warps": 4, "num_stages": 2}))
    return o, od


# ---------------------------------------------------------------------------------------------
# op registration and the public function

@torch.library.custom_op("fwdkernels::attention_dual", mutates_args=())
def _attention_dual_custom(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_dot: torch.Tensor | None,
                           k_dot: torch.Tensor | None, v_dot: torch.Tensor | None,
                           attn_mask: torch.Tensor | None, causal: bool, scale: float, K: int,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_dual_op.impl(backend)(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, scale, K)


@_attention_dual_custom.register_fake
def _(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, scale, K, backend):
    B, H, L, D = q.shape
    return q.new_empty((B, H, L, D)), q.new_empty((K, B, H, L, D))


def _err(msg, exc=ValueError):
    return exc(f"attention_dual: {msg}")


def attention_dual(q, k, v, q_dot=None, k_dot=None, v_dot=None, attn_mask=None, causal=False, scale=None,
                   backend=None):
    """Dual of ``o = softmax(scale q k^T + mask) v`` for K tangent streams, in one fused pass.

    Args:
        q: (B, H, L, D) queries.  k, v: (B, Hkv, S, D) keys and values, H % Hkv == 0 (grouped-query
            attention: query head h uses kv head h // (H // Hkv)).
        q_dot: (K, B, H, L, D), k_dot / v_dot: (K, B, Hkv, S, D) tangents, each None when no tangent flows
            there; K (the number of tangent streams) must agree between those given.
        attn_mask: None, a boolean mask (True = attend) or an additive float mask, broadcastable to
            (B, H, L, S) (e.g. (B, 1, 1, S) padding, (B, 1, L, S), (1, 1, L, S)).
        causal: also mask key j for query i unless j <= i + (S - L) (bottom-right aligned when S > L).
        scale: score scale, default 1 / sqrt(D).
        backend: None (auto), "reference", "cpp", "triton" or "cuda".

    A query row whose every key is masked (by attn_mask and/or causal) gets o = 0 and o_dot = 0.

    Returns:
        (o, o_dot): o (B, H, L, D) and o_dot (K, B, H, L, D) in q's dtype (float32 accumulation; the
        reference backend accumulates float64 inputs in float64); o_dot is None when q_dot, k_dot and
        v_dot are all None.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise _err(f"{name} must be a tensor, got {type(t).__name__}", TypeError)
        if t.dim() != 4:
            want = "(B, H, L, D)" if name == "q" else "(B, Hkv, S, D)"
            raise _err(f"{name} must be 4-D {want}, got shape {tuple(t.shape)}")
    B, H, L, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise _err(f"k must have shape (B, Hkv, S, D) with B={B}, D={D} as in q, got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise _err(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    if min(B, H, L, D, Hkv, S) == 0:
        raise _err(f"empty inputs are not supported: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if H % Hkv != 0:
        raise _err(f"the number of query heads H={H} must be a multiple of the kv heads Hkv={Hkv}")
    if not q.dtype.is_floating_point:
        raise _err(f"q must be floating point, got {q.dtype}", TypeError)
    dev = q.device
    K = None
    for name, t, shape in (("q_dot", q_dot, (B, H, L, D)), ("k_dot", k_dot, (B, Hkv, S, D)),
                           ("v_dot", v_dot, (B, Hkv, S, D))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise _err(f"{name} must be a tensor or None, got {type(t).__name__}", TypeError)
        if t.dim() != 5 or tuple(t.shape[1:]) != shape:
            raise _err(f"{name} must have shape (K, {', '.join(map(str, shape))}), got {tuple(t.shape)}")
        if K is None:
            K = t.shape[0]
        elif t.shape[0] != K:
            raise _err(f"{name} has {t.shape[0]} tangent streams but the tangents before it have K={K}")
    if K == 0:
        raise _err("the tangents have K = 0 streams; pass None for no tangent")
    for name, t in (("k", k), ("v", v), ("q_dot", q_dot), ("k_dot", k_dot), ("v_dot", v_dot)):
        if t is None:
            continue
        if t.device != dev:
            raise _err(f"{name} is on {t.device} but q is on {dev}")
        if t.dtype != q.dtype:
            raise _err(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k, v and the tangents must share "
                       "one dtype", TypeError)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise _err(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}", TypeError)
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise _err(f"attn_mask must be bool (True = attend) or an additive float mask, got {attn_mask.dtype}",
                       TypeError)
        if attn_mask.device != dev:
            raise _err(f"attn_mask is on {attn_mask.device} but q is on {dev}")
        full = (B, H, L, S)
        ok = attn_mask.dim() <= 4 and all(
            m in (1, f) for m, f in zip(reversed(attn_mask.shape), reversed(full)))
        if not ok:
            raise _err(f"attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to (B, H, L, S) = {full}")
    if not isinstance(causal, bool):
        raise _err(f"causal must be a bool, got {type(causal).__name__}", TypeError)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise _err(f"scale must be a number or None, got {type(scale).__name__}", TypeError)
    scale = float(scale)
    if not math.isfinite(scale):
        raise _err(f"scale must be finite, got {scale}")
    b = attention_dual_op.choose(dev, backend, q=q)
    o, od = torch.ops.fwdkernels.attention_dual(q, k, v, q_dot, k_dot, v_dot, attn_mask, causal, scale,
                                                 K or 0, b)
    return o, (od if K else None)
