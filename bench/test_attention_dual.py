"""Dual attention: the fused cpp kernel vs the reference backend vs torch.func.jvp + vmap of eager attention.

Shape: B = 8, H = 12 (Hkv = 12 and Hkv = 4), L = S = 128, D = 32 (MiniLM-like), K in {1, 8}, float32,
tangents on q, k and v, with and without the causal mask. Every implementation returns the primal output
and the K tangent streams (jvp_vmap: of a plain softmax attention; torch's fused CPU SDPA has no
forward-mode AD); "sdpa_primal" (torch's scaled_dot_product_attention, primal only) is the
floor for one attention. bench/report.py tabulates them in bench/RESULTS.md.
"""
import pytest
import torch

import fwdkernels as fk
from memory import peak_extra_bytes

B, H, L, S, D = 8, 12, 128, 128, 32
KS = [1, 8]
IMPLS = ["fused_cpp", "reference", "jvp_vmap", "sdpa_primal"]


def _sdpa(q, k, v, causal):
    G = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=causal)


def _eager(q, k, v, causal):
    """Plain softmax attention (torch's fused CPU SDPA has no forward-mode AD)."""
    G = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(G, 1).transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v.repeat_interleave(G, 1)


def make_case(impl, Hkv, K, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(B, H, L, D, generator=g), torch.randn(B, Hkv, S, D, generator=g), torch.randn(
        B, Hkv, S, D, generator=g)
    qd, kd, vd = (torch.randn(K, *t.shape, generator=g) for t in (q, k, v))
    if impl == "fused_cpp":
        return lambda: fk.attention_dual(q, k, v, qd, kd, vd, causal=causal, backend="cpp")
    if impl == "reference":
        return lambda: fk.attention_dual(q, k, v, qd, kd, vd, causal=causal, backend="reference")
    if impl == "jvp_vmap":
        f = lambda a, b, c: _eager(a, b, c, causal)  # noqa: E731
        return lambda: torch.func.vmap(lambda x, y, z: torch.func.jvp(f, (q, k, v), (x, y, z)))(qd, kd, vd)
    if impl == "sdpa_primal":
        return lambda: _sdpa(q, k, v, causal)
    raise ValueError(impl)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("Hkv", [H, 4], ids=lambda h: f"Hkv{h}")
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_dual(benchmark, impl, Hkv, K, causal):
    fn = make_case(impl, Hkv, K, causal)
    benchmark.group = f"attention_dual B={B} H={H} Hkv={Hkv} L=S={L} D={D} K={K} {'causal' if causal else 'full'}"
    benchmark.extra_info.update(op="attention_dual", impl=impl, B=B, H=H, Hkv=Hkv, L=L, S=S, D=D, K=K,
                                causal=causal, threads=torch.get_num_threads(),
                                peak_extra_bytes=peak_extra_bytes(fn))
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
