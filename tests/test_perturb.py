"""Tests of fwdkernels.perturb / philox_words / derive_seed (fwdkernels/perturb.py, csrc/core/philox.h).

Ground truth here is independent of the library: a scalar pure-Python Philox4x32-10 checked against the
Random123 known-answer vectors, a float64 Box-Muller written from the documented formula, and a
pure-Python splitmix64 checked against the published splitmix64 output sequence.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fwdkernels as fk
from fwdkernels.perturb import perturb_op, words_op


from kernel_helpers import TRITON_INTERPRETED, backend_available, needs_cpp, needs_triton  # noqa: E402

ALL_BACKENDS = ("reference", "cpp", "triton")
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not backend_available(b), reason=f"{b} backend unavailable"))
            for b in ALL_BACKENDS]
FAST_BACKENDS = [b for b in ALL_BACKENDS if backend_available(b)]

U64 = (1 << 64) - 1
M32 = 0xFFFFFFFF

# ---------------------------------------------------------------------------------------------
# independent ground truth


def py_philox4x32_10(ctr, key):
    """Scalar Philox4x32-10 (Salmon et al. 2011), straight from the paper's round function."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0 = (k0 + 0x9E3779B9) & M32
        k1 = (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def py_words(seed: int, counter: int):
    """The library's documented mapping: key = seed's two 32-bit halves, counter = (lo, hi, 0, 0)."""
    s = seed & U64
    return py_philox4x32_10((counter & M32, (counter >> 32) & M32, 0, 0), (s & M32, s >> 32))


def py_splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def py_derive_seed(base: int, *ints: int) -> int:
    s = base & U64
    for i in ints:
        s = py_splitmix64(s ^ py_splitmix64(i & U64))
    return s - (1 << 64) if s >= (1 << 63) else s


def normal_float64_from_words(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """tl.randn as documented, but evaluated in float64 (only the uniform scale is float32)."""
    def uniform(w):
        x = torch.where(w >= (1 << 31), w - (1 << 32), w)
        x = torch.where(x < 0, -x - 1, x)
        return x.to(torch.float64) * float(torch.tensor(4.6566127342e-10, dtype=torch.float32))
    u1 = uniform(w0).clamp_min(1e-7)
    u2 = uniform(w1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


RANDOM123_KAT = [  # (counter, key, expected) from Random123's kat_vectors, philox4x32 with 10 rounds
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

SEEDS = [0, 1, 12345, -1, -(1 << 63), (1 << 63), U64, 0x0123456789ABCDEF, 1 << 32, M32, -987654321987]
OFFSETS = [0, 7, (1 << 32) - 5, (1 << 40) + 3]


@pytest.mark.parametrize("ctr,key,expected", RANDOM123_KAT)
def test_python_philox_matches_random123_kat(ctr, key, expected):
    assert py_philox4x32_10(ctr, key) == expected


def test_python_splitmix64_matches_published_sequence():
    # splitmix64 (Vigna) from state 0: outputs are mix(n * golden) for n = 1, 2, 3, ...
    golden = 0x9E3779B97F4A7C15
    expected = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [py_splitmix64((n * golden) & U64) for n in range(3)] == expected


# ---------------------------------------------------------------------------------------------
# Philox words


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_answer(backend):
    w = fk.philox_words(0, 3, 0, backend=backend)
    assert w.dtype == torch.int64 and w.shape == (3, 4)
    assert w[0].tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    # counter 1 (c0 = 1) against the independent implementation
    assert w[1].tolist() == list(py_words(0, 1))


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("seed", SEEDS)
def test_words_bit_identical_across_backends(seed, offset):
    n = 1500  # more than one Triton block of 1024
    ref = fk.philox_words(seed, n, offset, backend="reference")
    assert ref.dtype == torch.int64 and ref.shape == (n, 4)
    assert int(ref.min()) >= 0 and int(ref.max()) <= M32
    for i in (0, 1, 4, 5, n - 1):  # includes the 2**32 counter carry for offset 2**32 - 5
        assert ref[i].tolist() == list(py_words(seed, offset + i)), (seed, offset, i)
    for b in FAST_BACKENDS:
        got = fk.philox_words(seed, n, offset, backend=b)
        assert got.dtype == torch.int64 and got.shape == (n, 4)
        assert torch.equal(got, ref), f"{b} words differ from reference for seed={seed} offset={offset}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_seed_is_twos_complement(backend):
    for neg in (-1, -(1 << 63), -123456789):
        a = fk.philox_words(neg, 16, 3, backend=backend)
        b = fk.philox_words(neg + (1 << 64), 16, 3, backend=backend)
        assert torch.equal(a, b)
        assert fk.seed_to_int64(neg + (1 << 64)) == neg


@pytest.mark.parametrize("backend", BACKENDS)
def test_counter_carry_uses_high_word(backend):
    # a kernel that truncated the counter to 32 bits would repeat counter 0 at 2**32
    w = fk.philox_words(99, 2, (1 << 32) - 1, backend=backend)
    assert w[0].tolist() == list(py_words(99, (1 << 32) - 1))
    assert w[1].tolist() == list(py_words(99, 1 << 32))
    assert w[1].tolist() != list(py_words(99, 0))
    v = fk.perturb(99, 64, (1 << 32) - 32, "normal", backend=backend)
    assert not torch.equal(v[32:], fk.perturb(99, 32, 0, "normal", backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_of_counter_range(backend):
    # the largest counters accepted (offset + numel <= 2**63 - 1) are generated like any other
    top = (1 << 63) - 1
    w = fk.philox_words(7, 3, top - 3, backend=backend)
    assert [row for row in w.tolist()] == [list(py_words(7, top - 3 + i)) for i in range(3)]
    v = fk.perturb(7, 3, top - 3, "rademacher", backend=backend)
    assert v.tolist() == [1.0 if py_words(7, top - 3 + i)[0] < (1 << 31) else -1.0 for i in range(3)]
    with pytest.raises(ValueError, match="int64 counter range"):
        fk.perturb(7, 4, top - 3, backend=backend)


# ---------------------------------------------------------------------------------------------
# perturbation values


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("seed", SEEDS[::2])
def test_rademacher_identical_across_backends(seed, offset):
    n = 1300
    words = fk.philox_words(seed, n, offset, backend="reference")
    expected = torch.where(words[:, 0] >= (1 << 31), -1.0, 1.0).to(torch.float32)
    for b in FAST_BACKENDS:
        v = fk.perturb(seed, n, offset, "rademacher", backend=b)
        assert v.dtype == torch.float32 and v.shape == (n,)
        assert torch.equal(v, expected), b


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("seed", SEEDS[1::2])
def test_normal_agrees_across_backends(seed, offset):
    n = 1300
    ref = fk.perturb(seed, n, offset, "normal", backend="reference")
    assert ref.dtype == torch.float32 and torch.isfinite(ref).all()
    words = fk.philox_words(seed, n, offset, backend="reference")
    ind = normal_float64_from_words(words[:, 0], words[:, 1])
    # float32 evaluation against float64: the float32 angle 2*pi*u2 alone carries an error up to
    # ulp(2*pi)/2 = 2.4e-7 rad, times r <= 5.7
    torch.testing.assert_close(ref.double(), ind, rtol=1e-5, atol=1e-5)
    for b in FAST_BACKENDS:
        got = fk.perturb(seed, n, offset, "normal", backend=b)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6, msg=lambda m: f"{b}: {m}")


@needs_cpp
@pytest.mark.parametrize("dist", ["rademacher", "normal"])
@pytest.mark.parametrize("seed,offset", [(3, 0), (-77, (1 << 32) - 5), (U64, 12345)])
def test_bf16_cpp_is_rounded_float32(dist, seed, offset):
    n = 5000
    got = fk.perturb(seed, n, offset, dist, dtype=torch.bfloat16, backend="cpp")
    assert got.dtype == torch.bfloat16 and got.shape == (n,)
    ref32 = fk.perturb(seed, n, offset, dist, backend="reference")
    if dist == "rademacher":
        assert torch.equal(got, ref32.to(torch.bfloat16))
    else:
        # exactly the cpp float32 values rounded to nearest even ...
        assert torch.equal(got, fk.perturb(seed, n, offset, dist, backend="cpp").to(torch.bfloat16))
        # ... and the reference's float32 rounded to bf16, up to the rare element where the two float32
        # values (which may differ by an ulp) straddle a bf16 rounding boundary
        want = ref32.to(torch.bfloat16)
        diff = got != want
        assert int(diff.sum()) <= max(1, n // 1000)
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dist", ["rademacher", "normal"])
def test_bf16_close_to_float32(backend, dist):
    n = 3000
    got = fk.perturb(7, n, 11, dist, dtype=torch.bfloat16, backend=backend)
    ref32 = fk.perturb(7, n, 11, dist, backend="reference")
    assert got.dtype == torch.bfloat16
    # within one bf16 ulp of the float32 value, whatever the rounding mode
    torch.testing.assert_close(got.float(), ref32, rtol=2 ** -7, atol=1e-30)


@needs_triton
def test_bf16_triton_rounds_to_nearest_even():
    got = fk.perturb(7, 3000, 11, "normal", dtype=torch.bfloat16, backend="triton")
    assert torch.equal(got, fk.perturb(7, 3000, 11, "normal", backend="triton").to(torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_output(backend):
    if backend == "reference":
        v = fk.perturb(5, 100, 0, "normal", dtype=torch.float64, backend=backend)
        assert v.dtype == torch.float64
        assert torch.equal(v, fk.perturb(5, 100, 0, "normal", backend="reference").double())
    else:
        with pytest.raises(RuntimeError, match=f"{backend}.*float32 or bfloat16"):
            fk.perturb(5, 100, 0, "normal", dtype=torch.float64, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dist", ["rademacher", "normal"])
@pytest.mark.parametrize("offset,a,b", [(0, 0, 1), (0, 17, 1029), (1000, 3, 4), ((1 << 32) - 5, 2, 11), (5, 1023, 1100)])
def test_slice_property(backend, dist, offset, a, b):
    n = 1200
    full = fk.perturb(42, n, offset, dist, backend=backend)
    part = fk.perturb(42, b - a, offset + a, dist, backend=backend)
    assert torch.equal(full[a:b], part)
    wf = fk.philox_words(42, n, offset, backend=backend)
    assert torch.equal(wf[a:b], fk.philox_words(42, b - a, offset + a, backend=backend))


@needs_cpp
@pytest.mark.parametrize("dist", ["rademacher", "normal"])
@pytest.mark.parametrize("n,offset", [(70001, (1 << 32) - 40000), (4099, 3), (9, (1 << 32) - 3), (1, 5)])
def test_cpp_long_and_short_ranges(n, offset, dist):
    """cpp generates 8 lanes at a time in 4096-element chunks, threaded above 65536 elements: every
    chunk/lane/thread boundary (and the 2**32 carry inside a lane group) must match the reference."""
    got = fk.perturb(-424242, n, offset, dist, backend="cpp")
    want = fk.perturb(-424242, n, offset, dist, backend="reference")
    if dist == "rademacher":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(fk.philox_words(-424242, n, offset, backend="cpp"),
                       fk.philox_words(-424242, n, offset, backend="reference"))


def test_seed_changes_values():
    a = fk.perturb(1, 4096)
    b = fk.perturb(2, 4096)
    c = fk.perturb(1 + (1 << 32), 4096)  # differs only in the key's high word
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert (a != b).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert (a != c).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_tensor_seed_accepted():
    assert torch.equal(fk.perturb(torch.tensor(-5), 64), fk.perturb(-5, 64))


# ---------------------------------------------------------------------------------------------
# statistics (n = 200k; bounds are ~5 standard errors)

N_STAT = 200_000


@pytest.mark.parametrize("seed", [0, -31337])
def test_rademacher_statistics(seed):
    v = fk.perturb(seed, N_STAT, 1 << 20, "rademacher").double()
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    se = 1 / math.sqrt(N_STAT)
    assert abs(v.mean().item()) < 5 * se
    assert (v * v).mean().item() == 1.0
    var = v.var(unbiased=False).item()  # = 1 - mean**2 for +-1 values
    assert 0.0 <= 1.0 - var < 25 * se * se + 1e-12
    # no lag-1 correlation, none between seeds
    assert abs((v[1:] * v[:-1]).mean().item()) < 5 * se
    w = fk.perturb(seed + 1, N_STAT, 1 << 20, "rademacher").double()
    assert abs((v * w).mean().item()) < 5 * se


@pytest.mark.parametrize("seed", [0, -31337])
def test_normal_statistics(seed):
    v = fk.perturb(seed, N_STAT, 12345, "normal").double()
    assert torch.isfinite(v).all()
    n = N_STAT
    mean = v.mean().item()
    c = v - mean
    var = (c ** 2).mean().item()
    skew = (c ** 3).mean().item() / var ** 1.5
    exkurt = (c ** 4).mean().item() / var ** 2 - 3.0
    assert abs(mean) < 5 / math.sqrt(n)               # se 0.0022
    assert abs(var - 1.0) < 5 * math.sqrt(2 / n)      # se 0.0032
    assert abs(skew) < 5 * math.sqrt(6 / n)           # se 0.0055
    assert abs(exkurt) < 5 * math.sqrt(24 / n)        # se 0.011
    # Box-Muller with u1 clamped at 1e-7 cannot exceed sqrt(-2 ln 1e-7) = 5.678
    assert v.abs().max().item() <= math.sqrt(-2 * math.log(1e-7)) + 1e-4
    # coverage of +-1 and +-2 sigma (Phi: 0.6827, 0.9545), se <= sqrt(p(1-p)/n) ~ 0.001
    assert abs((v.abs() < 1).double().mean().item() - 0.682689) < 0.006
    assert abs((v.abs() < 2).double().mean().item() - 0.954500) < 0.004
    assert abs((v[1:] * v[:-1]).mean().item()) < 5 / math.sqrt(n)


# ---------------------------------------------------------------------------------------------
# derive_seed


def test_derive_seed_identity_and_known_values():
    for b in (0, 1, -1, 123456789, -(1 << 63), (1 << 63) - 1):
        assert fk.derive_seed(b) == b
    assert fk.derive_seed((1 << 64) - 1) == -1
    # against the independent implementation
    assert fk.derive_seed(0, 0) == py_derive_seed(0, 0)
    assert fk.derive_seed(0, 0) & U64 == py_splitmix64(0xE220A8397B1DCDAF)
    for base, ints in [(0, (1, 2, 3)), (-5, (0,)), (U64, (7, -1, 1 << 63)), (2024, (3, 11, 4, 9)),
                       (0x0123456789ABCDEF, (-(1 << 63), (1 << 64) - 1))]:
        assert fk.derive_seed(base, *ints) == py_derive_seed(base, *ints)


def test_derive_seed_properties():
    base = 0xC0FFEE
    # determinism and int64 range
    assert fk.derive_seed(base, 3, 4, 5) == fk.derive_seed(base, 3, 4, 5)
    # order matters, and every extra integer changes the seed
    assert fk.derive_seed(base, 1, 2) != fk.derive_seed(base, 2, 1)
    assert fk.derive_seed(base, 0) != base
    assert fk.derive_seed(base, 0, 0) != fk.derive_seed(base, 0)
    # it is a fold: derive_seed(b, t, c) == derive_seed(derive_seed(b, t), c)
    assert fk.derive_seed(base, 8, 9) == fk.derive_seed(fk.derive_seed(base, 8), 9)
    # integers are taken modulo 2**64
    assert fk.derive_seed(base, -1) == fk.derive_seed(base, U64)
    assert fk.derive_seed(base, torch.tensor(7)) == fk.derive_seed(base, 7)
    # distinct over a (t, c, j) grid (which contains every permutation of its triples)
    seen = {}
    for t in range(12):
        for c in range(12):
            for j in range(12):
                s = fk.derive_seed(base, t, c, j)
                assert -(1 << 63) <= s < (1 << 63)
                assert s not in seen, (t, c, j, seen.get(s))
                seen[s] = (t, c, j)
    # usable as a seeds tensor entry
    torch.tensor(list(seen)[:10], dtype=torch.int64)


@needs_cpp
def test_derive_seed_matches_c_api():
    for base, ints in [(0, [1, 2, 3]), (-5, [0]), (U64, [7, -1]), (99, [])]:
        assert fk._ext.C.derive_seed(base & U64, ints) == fk.derive_seed(base, *ints) & U64


def test_derive_seed_errors():
    with pytest.raises(TypeError, match="ints"):
        fk.derive_seed(1, 2.5)
    with pytest.raises(TypeError, match="ints"):
        fk.derive_seed(1, "3")
    with pytest.raises(TypeError, match="seed must be an int"):
        fk.derive_seed(1.0, 2)
    with pytest.raises(ValueError, match="64 bits"):
        fk.derive_seed(1 << 64, 2)


# ---------------------------------------------------------------------------------------------
# errors and dispatch


@pytest.mark.parametrize("fn", ["perturb", "philox_words"])
def test_argument_errors(fn):
    f = getattr(fk, fn)
    with pytest.raises(ValueError, match="offset must be non-negative"):
        f(1, 10, -1)
    with pytest.raises(ValueError, match="numel must be positive"):
        f(1, 0)
    with pytest.raises(ValueError, match="numel must be positive"):
        f(1, -3)
    with pytest.raises(TypeError, match="numel must be an int"):
        f(1, 10.0)
    with pytest.raises(TypeError, match="offset must be an int"):
        f(1, 10, 2.0)
    with pytest.raises(ValueError, match="int64 counter range"):
        f(1, 10, (1 << 63) - 5)
    for bad in (1.5, "3", None, True, [1]):
        with pytest.raises(TypeError, match="seed must be an int"):
            f(bad, 10)
    for bad in (1 << 64, (1 << 70), -(1 << 63) - 1):
        with pytest.raises(ValueError, match="does not fit in 64 bits"):
            f(bad, 10)


def test_float_tensor_seed_rejected():
    with pytest.raises(TypeError):
        fk.perturb(torch.tensor(1.5), 10)


def test_perturb_dist_and_dtype_errors():
    with pytest.raises(ValueError, match="dist must be one of"):
        fk.perturb(1, 10, dist="gaussian")
    with pytest.raises(TypeError, match="floating torch.dtype"):
        fk.perturb(1, 10, dtype=torch.int32)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        fk.perturb(1, 10, dtype="float32")


def test_forced_cuda_backend_fails_with_reason():
    for call in (lambda: fk.perturb(1, 10, backend="cuda"), lambda: fk.philox_words(1, 10, backend="cuda")):
        with pytest.raises(RuntimeError, match=r"(?s)backend='cuda' cannot serve.*cuda: "):
            call()


def test_unknown_backend_argument():
    with pytest.raises(RuntimeError, match="unknown backend 'bogus'"):
        fk.perturb(1, 10, backend="bogus")


def test_env_backend_bogus(monkeypatch):
    monkeypatch.setenv("FWDKERNELS_BACKEND", "bogus")
    with pytest.raises(RuntimeError, match=r"(?s)FWDKERNELS_BACKEND='bogus' cannot serve.*unknown backend"):
        fk.perturb(1, 10)
    with pytest.raises(RuntimeError, match="FWDKERNELS_BACKEND='bogus'"):
        fk.philox_words(1, 10)


def test_env_backend_forces_and_argument_wins(monkeypatch):
    monkeypatch.setenv("FWDKERNELS_BACKEND", "reference")
    assert perturb_op.choose("cpu", None, dtype=torch.float32) == "reference"
    assert words_op.choose("cpu", None) == "reference"
    if backend_available("cpp"):
        assert perturb_op.choose("cpu", "cpp", dtype=torch.float32) == "cpp"  # explicit argument wins
        monkeypatch.setenv("FWDKERNELS_BACKEND", "cpp")
        with pytest.raises(RuntimeError, match=r"(?s)FWDKERNELS_BACKEND='cpp'.*float32 or bfloat16.*float64"):
            fk.perturb(1, 10, dtype=torch.float64)  # must not fall back silently


@needs_triton
def test_triton_without_interpreter_refuses_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fk.perturb(1, 10, backend="triton")


def test_auto_dispatch():
    expected = "cpp" if backend_available("cpp") else "reference"
    assert perturb_op.choose("cpu", None, dtype=torch.float32) == expected
    assert perturb_op.choose("cpu", None, dtype=torch.bfloat16) == expected
    assert perturb_op.choose("cpu", None, dtype=torch.float64) == "reference"  # falls back: cpp cannot
    assert torch.equal(fk.perturb(3, 50, 2), fk.perturb(3, 50, 2, backend="reference"))


def test_extension_disabled_falls_back_in_subprocess():
    code = (
        "import torch\n"
        "import fwdkernels as fk\n"
        "assert fk._ext.C is None and 'FWDKERNELS_DISABLE_EXT' in fk._ext.LOAD_ERROR\n"
        "assert fk.available_backends()['cpp'], 'cpp must report itself unavailable'\n"
        "from fwdkernels.perturb import perturb_op\n"
        "assert perturb_op.choose('cpu', None, dtype=torch.float32) == 'reference'\n"
        "assert fk.philox_words(0, 1)[0].tolist() == [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]\n"
        "try:\n"
        "    fk.perturb(1, 4, backend='cpp')\n"
        "except RuntimeError as e:\n"
        "    assert 'FWDKERNELS_DISABLE_EXT' in str(e), str(e)\n"
        "else:\n"
        "    raise AssertionError('forced cpp backend did not fail')\n"
        "print('OK')\n"
    )
    env = dict(os.environ, FWDKERNELS_DISABLE_EXT="1")
    env.pop("FWDKERNELS_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# registered ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dist", ["rademacher", "normal"])
def test_opcheck_perturb(backend, dist):
    op = torch.ops.fwdkernels.perturb.default
    for args in [(123, 37, 5, dist, torch.float32, torch.device("cpu"), backend),
                 (-9, 8, (1 << 32) - 3, dist, torch.bfloat16, torch.device("cpu"), backend)]:
        torch.library.opcheck(op, args)
    out = op(123, 37, 5, dist, torch.float32, torch.device("cpu"), backend)
    assert torch.equal(out, fk.perturb(123, 37, 5, dist, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_philox_words(backend):
    op = torch.ops.fwdkernels.philox_words.default
    torch.library.opcheck(op, (123, 37, 5, torch.device("cpu"), backend))
    torch.library.opcheck(op, (-1, 3, (1 << 32) - 1, torch.device("cpu"), backend))
    assert torch.equal(op(7, 9, 2, torch.device("cpu"), backend), fk.philox_words(7, 9, 2, backend="reference"))
