"""Seeded perturbations: Philox4x32-10 words, Rademacher and normal values, and seed derivation.

Element i of the perturbation with seed ``s`` starting at global offset ``o`` is computed from
Philox4x32-10 with key (low 32 bits of s, high 32 bits of s) and counter (low 32 bits of o+i, high 32
bits of o+i, 0, 0), ten rounds, exactly Triton's ``tl.randint4x(s, o + i)`` for int64 offsets. So the
reference (vectorised torch), cpp (csrc/core/philox.h) and triton backends regenerate the same words.

* ``dist="rademacher"``: +1 where bit 31 of the first word is clear, -1 where it is set.
* ``dist="normal"``: Triton's ``tl.randn``: each of the first two words becomes a uniform as
  ``tl.rand`` does (as int32, negatives folded with ~x, times 4.6566127342e-10 in float32), then
  Box-Muller (r = sqrt(-2 log max(u1, 1e-7)), value r cos(2 pi u2)) in float32.

Seeds are 64-bit: any Python int in [-2**63, 2**64) (negative values are the two's complement, i.e.
the int64 view of a uint64 seed).
"""
from __future__ import annotations

import os

import torch

from . import _ext
from .backends import Op

DISTS = {"rademacher": 0, "normal": 1}
_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_U64 = (1 << 64) - 1


def seed_to_int64(seed) -> int:
    """Normalise a 64-bit seed to the signed int64 that torch tensors and kernels carry."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"a tensor seed must hold one integer, got dtype {seed.dtype} with {seed.numel()} elements")
        seed = int(seed)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not -(1 << 63) <= seed <= _U64:
        raise ValueError(f"seed {seed} does not fit in 64 bits")
    seed &= _U64
    return seed - (1 << 64) if seed >= (1 << 63) else seed


# ---------------------------------------------------------------------------------------------
# seed derivation (splitmix64 chain; same as fwdcore::derive_seed_step / fwd_derive_seed)

def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def derive_seed(base, *ints) -> int:
    """The seed of perturbation ``j`` of client ``c`` in round ``t``: ``derive_seed(base, t, c, j)``.

    Fold ``s <- splitmix64(s ^ splitmix64(i))`` over the integers, starting from ``s = base`` (so
    ``derive_seed(base) == base``). Integers are taken modulo 2**64. Returned as a signed int64 (the
    two's-complement view of the uint64 result), ready for an int64 seeds tensor. The C API's
    ``fwd_derive_seed`` computes the same value.
    """
    s = seed_to_int64(base) & _U64
    for i in ints:
        if isinstance(i, torch.Tensor):
            i = seed_to_int64(i)
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"derive_seed takes ints, got {type(i).__name__}")
        s = _splitmix64(s ^ _splitmix64(i & _U64))
    return seed_to_int64(s)


# ---------------------------------------------------------------------------------------------
# reference: vectorised torch in int64 (uint32 values kept in the low 32 bits)

def _mulhilo(a: torch.Tensor, b: int):
    """(high 32, low 32) of the 64-bit product of uint32 tensor a and uint32 constant b, in int64.

    int64 cannot hold the full product, so a is split in 16-bit halves:
    floor(a b / 2^32) = floor((ah b + floor(al b / 2^16)) / 2^16).
    """
    ah, al = a >> 16, a & 0xFFFF
    hi = ((ah * b) + ((al * b) >> 16)) >> 16
    lo = (a * b) & _MASK32  # int64 multiply wraps mod 2^64; the low 32 bits are exact
    return hi & _MASK32, lo


def philox_reference(seed, counters: torch.Tensor):
    """Philox4x32-10 words for int64 ``counters`` (any shape): four int64 tensors holding uint32."""
    s = seed_to_int64(seed) & _U64
    k0, k1 = s & _MASK32, s >> 32
    c0 = counters & _MASK32
    c1 = (counters >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mulhilo(c2, _ROUND_B)
        hi_a, lo_a = _mulhilo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform_from_words(w: torch.Tensor) -> torch.Tensor:
    x = torch.where(w >= (1 << 31), w - (1 << 32), w)  # as int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def values_from_words(w0: torch.Tensor, w1: torch.Tensor | None, dist: str) -> torch.Tensor:
    """float32 perturbation values from the first (and, for normal, second) Philox words."""
    if dist == "rademacher":
        return 1.0 - 2.0 * (w0 >> 31).to(torch.float32)
    u1 = torch.clamp_min(_uniform_from_words(w0), 1.0e-7)
    u2 = _uniform_from_words(w1)
    th = torch.tensor(6.283185307179586, dtype=torch.float32) * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th)


def _counters(numel: int, offset: int, device) -> torch.Tensor:
    return torch.arange(offset, offset + numel, dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------------
# Triton

_TRITON_KERNELS = None


def _triton_kernels():
    global _TRITON_KERNELS
    if _TRITON_KERNELS is None:
        import triton
        import triton.language as tl

        @triton.jit
        def perturb_kernel(out_ptr, seed, offset, n, DIST: tl.constexpr, BLOCK: tl.constexpr):
            idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
            mask = idx < n
            offs = offset + idx
            if DIST == 0:
                w = tl.randint(seed, offs)
                v = 1.0 - 2.0 * (w >> 31).to(tl.float32)
            else:
                v = tl.randn(seed, offs)
            tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=mask)

        @triton.jit
        def words_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
            idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
            mask = idx < n
            w0, w1, w2, w3 = tl.randint4x(seed, offset + idx)
            base = out_ptr + idx * 4
            tl.store(base + 0, w0.to(tl.int64) & 0xFFFFFFFF, mask=mask)
            tl.store(base + 1, w1.to(tl.int64) & 0xFFFFFFFF, mask=mask)
            tl.store(base + 2, w2.to(tl.int64) & 0xFFFFFFFF, mask=mask)
            tl.store(base + 3, w3.to(tl.int64) & 0xFFFFFFFF, mask=mask)

        _TRITON_KERNELS = (perturb_kernel, words_kernel)
    return _TRITON_KERNELS


_BLOCK = 1024

# ---------------------------------------------------------------------------------------------
# ops and dispatch

perturb_op = Op("perturb")
words_op = Op("philox_words")


def _dtype_reasons(dtype=None, **_):
    if dtype not in (torch.float32, torch.bfloat16):
        return [f"produces float32 or bfloat16 only, not {dtype}"]
    return []


def interpreter_bf16_reasons(dtype, device) -> list:
    """Triton's CPU interpreter gets bfloat16 wrong (float32 -> bf16 truncates; tl.dot on bf16 returns
    garbage), so the triton backend refuses bfloat16 there instead of returning wrong numbers."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu":
        return ["bfloat16 is not supported under Triton's CPU interpreter (it truncates bf16 conversions "
                "and computes bf16 tl.dot wrongly); use float32 or a GPU"]
    return []





@perturb_op.register("reference")
def _perturb_reference(seed, numel, offset, dist, dtype, device):
    w0, w1, _, _ = philox_reference(seed, _counters(numel, offset, device))
    return values_from_words(w0, w1, dist).to(dtype)


@perturb_op.register("cpp", _dtype_reasons)
def _perturb_cpp(seed, numel, offset, dist, dtype, device):
    return _ext.C.perturb(seed, numel, offset, DISTS[dist], dtype)


@perturb_op.register("triton", _dtype_reasons)
def _perturb_triton(seed, numel, offset, dist, dtype, device):
    kern, _ = _triton_kernels()
    # Triton's CPU interpreter truncates float32 -> bfloat16; round there with torch instead.
    interp_bf16 = bool(interpreter_bf16_reasons(dtype, device))
    out = torch.empty(numel, dtype=torch.float32 if interp_bf16 else dtype, device=device)
    kern[((numel + _BLOCK - 1) // _BLOCK,)](out, seed, offset, numel, DIST=DISTS[dist], BLOCK=_BLOCK)
    return out.to(dtype) if interp_bf16 else out


def _cuda_device_index(device) -> int:
    """The CUDA device index of ``device`` for the cuda backend's bindings (-1: the current device)."""
    index = torch.device(device).index
    return -1 if index is None else index


@perturb_op.register("cuda", _dtype_reasons)
def _perturb_cuda(seed, numel, offset, dist, dtype, device):
    return _ext.C_CUDA.perturb(seed, numel, offset, DISTS[dist], dtype, _cuda_device_index(device))


@words_op.register("reference")
def _words_reference(seed, numel, offset, device):
    return torch.stack(philox_reference(seed, _counters(numel, offset, device)), dim=1)


@words_op.register("cpp")
def _words_cpp(seed, numel, offset, device):
    return _ext.C.philox_words(seed, numel, offset)


@words_op.register("triton")
def _words_triton(seed, numel, offset, device):
    _, kern = _triton_kernels()
    out = torch.empty((numel, 4), dtype=torch.int64, device=device)
    kern[((numel + _BLOCK - 1) // _BLOCK,)](out, seed, offset, numel, BLOCK=_BLOCK)
    return out


@words_op.register("cuda")
def _words_cuda(seed, numel, offset, device):
    return _ext.C_CUDA.philox_words(seed, numel, offset, _cuda_device_index(device))


@torch.library.custom_op("fwdkernels::perturb", mutates_args=())
def _perturb_custom(seed: int, numel: int, offset: int, dist: str, dtype: torch.dtype, device: torch.device,
                    backend: str) -> torch.Tensor:
    return perturb_op.impl(backend)(seed, numel, offset, dist, dtype, device)


@_perturb_custom.register_fake
def _(seed, numel, offset, dist, dtype, device, backend):
    return torch.empty(numel, dtype=dtype, device=device)


@torch.library.custom_op("fwdkernels::philox_words", mutates_args=())
def _words_custom(seed: int, numel: int, offset: int, device: torch.device, backend: str) -> torch.Tensor:
    return words_op.impl(backend)(seed, numel, offset, device)


@_words_custom.register_fake
def _(seed, numel, offset, device, backend):
    return torch.empty((numel, 4), dtype=torch.int64, device=device)


def _check_range(numel, offset):
    for name, v in (("numel", numel), ("offset", offset)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if numel <= 0:
        raise ValueError(f"numel must be positive, got {numel}")
    if offset < 0:
        raise ValueError(f"offset must be non-negative, got {offset}")
    if offset + numel > (1 << 63) - 1:
        raise ValueError("offset + numel exceeds the int64 counter range")


def perturb(seed, numel: int, offset: int = 0, dist: str = "rademacher", dtype=torch.float32, device="cpu",
            backend: str | None = None) -> torch.Tensor:
    """Elements ``offset .. offset+numel-1`` of the perturbation defined by ``seed``: (numel,) tensor.

    The offset is the element's index in the flattened vector of all trainable parameters, so one seed
    defines one whole perturbation of a model and any slice of it can be regenerated alone.
    """
    seed = seed_to_int64(seed)
    _check_range(numel, offset)
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {tuple(DISTS)}, got {dist!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype}")
    device = torch.device(device)
    b = perturb_op.choose(device, backend, dtype=dtype)
    return torch.ops.fwdkernels.perturb(seed, numel, offset, dist, dtype, device, b)


def philox_words(seed, numel: int, offset: int = 0, device="cpu", backend: str | None = None) -> torch.Tensor:
    """The four Philox4x32-10 words for counters ``offset .. offset+numel-1``: (numel, 4) int64 in [0, 2**32)."""
    seed = seed_to_int64(seed)
    _check_range(numel, offset)
    device = torch.device(device)
    b = words_op.choose(device, backend)
    return torch.ops.fwdkernels.philox_words(seed, numel, offset, device, b)


def perturb_combine(seeds, coefficients, numel: int, offset: int = 0, dist: str = "rademacher",
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """out[i] += sum_j coefficients[j] * perturb(seeds[j])[offset + i] for i < numel: (numel,) float32 CPU.

    A gradient estimate rebuilt from (seed, coefficient) pairs. The compiled backend streams each
    seed's values through a cache-sized chunk of ``out`` (no (N, numel) buffer, no per-seed call);
    without it, one ``perturb`` per seed. ``out`` defaults to zeros.
    """
    s = torch.as_tensor([seed_to_int64(int(v)) for v in seeds] if not isinstance(seeds, torch.Tensor) else seeds,
                        dtype=torch.int64).reshape(-1).contiguous()
    c = torch.as_tensor(coefficients, dtype=torch.float32).reshape(-1).contiguous()
    if s.numel() != c.numel():
        raise ValueError(f"perturb_combine: {s.numel()} seeds but {c.numel()} coefficients")
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {tuple(DISTS)}, got {dist!r}")
    if not torch.isfinite(c).all():
        raise ValueError("perturb_combine: coefficients contain NaN or Inf")
    _check_range(max(int(numel), 1), offset)
    if out is None:
        out = torch.zeros(numel, dtype=torch.float32)
    elif out.dtype != torch.float32 or out.shape != (numel,) or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"perturb_combine: out must be a contiguous ({numel},) float32 CPU tensor")
    if s.numel() == 0 or numel == 0:
        return out
    # the compiled loop unless FWDKERNELS_BACKEND forces another backend (then per-seed perturb()
    # calls go through that backend, so a forced backend is honoured, or fails loudly, here too)
    forced = os.environ.get("FWDKERNELS_BACKEND") or None
    if _ext.C is not None and hasattr(_ext.C, "perturb_combine") and forced in (None, "cpp"):
        _ext.C.perturb_combine(s, c, int(offset), DISTS[dist], out)
    else:
        for sd, cf in zip(s.tolist(), c.tolist()):
            if cf != 0.0:
                out.add_(perturb(sd, numel, offset, dist), alpha=cf)
    return out
