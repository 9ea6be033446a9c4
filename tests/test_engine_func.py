"""fwdllm.func on user functions: jvp (torch.func.jvp's contract), batched_jvp (K tangents, one pass),
seeded_jvp, vmap over jvp; against torch.func.jvp in float64 (SDPA through its math backend, which
torch.func can differentiate; the engine fuses SDPA itself, on CPU where torch has no forward AD for it).
Odd shapes, GQA, causal with L != S, masks, and the errors a user can make."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fwdkernels as fk
import fwdllm
from fwdllm.engine import STATS


def _ref_jvp(f, primals, tangents):
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(f, primals, tangents)


def lora_block(x, Wq, Wk, Wv, Wo, W1, W2, Aq, Bq, Av, Bv, g1, g2, H=6, s=2.0):
    """A user's own LoRA transformer block in torch.nn.functional: LayerNorm, q/v LoRA, SDPA, MLP."""
    B, L, d = x.shape
    h = F.layer_norm(x, (d,), g1)
    q = F.linear(h, Wq) + s * F.linear(F.linear(h, Aq), Bq)
    k = F.linear(h, Wk)
    v = F.linear(h, Wv) + s * F.linear(F.linear(h, Av), Bv)
    q, k, v = (t.view(B, L, H, d // H).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + F.linear(o.transpose(1, 2).reshape(B, L, d), Wo)
    h = F.layer_norm(x, (d,), g2)
    return x + F.linear(F.gelu(F.linear(h, W1)), W2)


def block_params(d=24, r=3, B=2, L=7, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rn(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype)
    x = rn(B, L, d)
    frozen = [rn(d, d, scale=d ** -0.5) for _ in range(4)] + [rn(4 * d, d, scale=d ** -0.5),
                                                            rn(d, 4 * d, scale=(4 * d) ** -0.5)]
    lora = [rn(r, d, scale=0.3), rn(d, r, scale=0.3), rn(r, d, scale=0.3), rn(d, r, scale=0.3)]
    gains = [1 + rn(d, scale=0.1), 1 + rn(d, scale=0.1)]
    return x, frozen, lora, gains


def test_jvp_matches_torch_func_on_a_user_block():
    x, frozen, lora, gains = block_params()
    g = torch.Generator().manual_seed(1)
    tangents = tuple(torch.randn(p.shape, generator=g, dtype=p.dtype) for p in [x] + lora)

    def f(x, *ab):
        return lora_block(x, *frozen, *ab, *gains)
    out, j = fwdllm.func.jvp(f, (x, *lora), tangents)
    rout, rj = _ref_jvp(f, (x, *lora), tangents)
    torch.testing.assert_close(out, rout)
    torch.testing.assert_close(j, rj)


def test_batched_jvp_is_k_jvps_in_one_pass():
    x, frozen, lora, gains = block_params(dtype=torch.float32)
    K = 5
    g = torch.Generator().manual_seed(2)
    tangents = tuple(torch.randn(K, *p.shape, generator=g) for p in lora)

    def f(*ab):
        return lora_block(x, *frozen, *ab, *gains)
    STATS.reset()
    out, jv = fwdllm.func.batched_jvp(f, tuple(lora), tangents)
    assert jv.shape == (K, *out.shape)
    assert STATS.counts["fused"]["attention"] == 1 and STATS.totals()["generic"] == 0
    x64, fr64, lo64, ga64 = x.double(), [w.double() for w in frozen], [p.double() for p in lora], \
        [w.double() for w in gains]
    for k in range(K):
        _, rj = _ref_jvp(lambda *ab: lora_block(x64, *fr64, *ab, *ga64), tuple(lo64),
                         tuple(t[k].double() for t in tangents))
        torch.testing.assert_close(jv[k].double(), rj, rtol=1e-4, atol=1e-5)


def test_vmap_over_jvp_folds_into_one_pass():
    x, frozen, lora, gains = block_params()
    K = 4
    g = torch.Generator().manual_seed(3)
    T = torch.randn(K, *lora[0].shape, generator=g, dtype=torch.float64)

    def f(a):
        return lora_block(x, *frozen, a, *lora[1:], *gains)
    calls = []
    orig = fwdllm.func.batched_jvp

    def spy(*a, **k):
        calls.append(a[2][0].shape[0])
        return orig(*a, **k)
    fwdllm.func.batched_jvp = spy
    try:
        jv = torch.func.vmap(lambda t: fwdllm.func.jvp(f, (lora[0],), (t,))[1])(T)
    finally:
        fwdllm.func.batched_jvp = orig
    assert calls == [K]  # one dual pass with K streams, not K passes
    ref = torch.stack([_ref_jvp(f, (lora[0],), (T[k],))[1] for k in range(K)])
    torch.testing.assert_close(jv, ref)
    # vmap over primals too: one pass per element, still exact
    P2 = torch.stack([lora[0], 2 * lora[0]])
    T2 = T[:2]
    jv2 = torch.func.vmap(lambda p, t: fwdllm.func.jvp(f, (p,), (t,))[1])(P2, T2)
    torch.testing.assert_close(jv2[1], _ref_jvp(f, (P2[1],), (T2[1],))[1])


def test_seeded_jvp_regenerates_the_perturbations():
    x, frozen, lora, gains = block_params(dtype=torch.float32)
    seeds = torch.tensor([fk.derive_seed(9, k) for k in range(3)])

    def f(*ab):
        return lora_block(x, *frozen, *ab, *gains).sum()
    out, jv = fwdllm.func.seeded_jvp(f, tuple(lora), seeds)
    n = sum(p.numel() for p in lora)
    for k, s in enumerate(seeds.tolist()):
        v = fk.perturb(s, n, 0)
        ts, o = [], 0
        for p in lora:
            ts.append(v[o:o + p.numel()].view_as(p))
            o += p.numel()
        _, rj = _ref_jvp(f, tuple(lora), tuple(ts))
        torch.testing.assert_close(jv[k], rj, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("H,Hkv,L,S,causal,mask", [
    (4, 4, 5, 5, False, None), (4, 2, 6, 6, True, None), (3, 3, 4, 9, True, None), (2, 1, 7, 3, False, "bool"),
    (2, 2, 5, 5, False, "float"), (1, 1, 1, 4, False, None)])
def test_sdpa_rule(H, Hkv, L, S, causal, mask):
    g = torch.Generator().manual_seed(4)
    B, D = 2, 8
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    m = None
    if mask == "bool":
        m = torch.rand(B, 1, L, S, generator=g) > 0.3
        m[..., 0] = True
    elif mask == "float":
        m = torch.randn(B, 1, L, S, generator=g, dtype=torch.float64)
    ts = tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (q, k, v))

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=H != Hkv,
                                              scale=0.7)
    out, j = fwdllm.func.jvp(f, (q, k, v), ts)
    rout, rj = _ref_jvp(f, (q, k, v), ts)
    torch.testing.assert_close(out, rout)
    torch.testing.assert_close(j, rj)


def test_sdpa_other_ranks():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ts = tuple(torch.randn(3, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    f = F.scaled_dot_product_attention
    torch.testing.assert_close(fwdllm.func.jvp(f, (q, k, v), ts)[1], _ref_jvp(f, (q, k, v), ts)[1])


OPS = [
    ("softmax", lambda x: torch.softmax(x * 2, dim=-2)),
    ("log_softmax", lambda x: F.log_softmax(x, dim=1)),
    ("logsumexp", lambda x: torch.logsumexp(x, dim=(0, 2))),
    ("var_std", lambda x: x.var(dim=-1, keepdim=True) + x.std(1)[:, None]),
    ("norms", lambda x: F.layer_norm(x, (x.shape[-1],)) + F.rms_norm(x, (x.shape[-1],), eps=1e-6)),
    ("elementwise", lambda x: torch.exp(-x.abs()) + x.sigmoid() * torch.tanh(x) - 1 / (2 + x.pow(2)) + x.rsqrt().nan_to_num()),
    ("activations", lambda x: F.gelu(x) + F.gelu(x, approximate="tanh") + F.silu(x) + F.relu(x) + F.softplus(x)),
    ("shapes", lambda x: x.transpose(0, 2).reshape(-1, 3).flip(0)[1::2].unsqueeze(1).expand(-1, 2, -1).sum(1)),
    ("index", lambda x: x[torch.tensor([2, 0]), 1:, None, ..., -1] + x[..., 0].permute(1, 0)[:3].mean()),
    ("cat_split", lambda x: torch.cat(torch.split(x, 2, dim=1)[::-1], dim=1) * torch.stack(x.unbind(2), 2)),
    ("where_mask", lambda x: torch.where(x > 0, x, x * 0.1).masked_fill(x < -1, 3.0)),
    ("matmul_einsum", lambda x: x @ x.transpose(-1, -2) + torch.einsum("abc,abd->acd", x, x).sum()),
    ("clamp_pow", lambda x: x.clamp(-0.5, 0.7) ** 3 + torch.clamp(x, min=0.2)),
    ("losses", lambda x: F.cross_entropy(x.reshape(-1, x.shape[-1]), torch.arange(x.numel() // x.shape[-1]) % 5)
     + F.mse_loss(x, torch.ones_like(x)) + F.binary_cross_entropy_with_logits(x, (x > 0).to(x.dtype))),
    ("cumsum_pad", lambda x: F.pad(x.cumsum(1), (1, 2)) * 2),
    ("inplace", lambda x: _inplace(x)),
]


def _inplace(x):
    y = x * 1.5
    y += x
    y[:, 0] = x[:, 1] * 2
    z = torch.zeros_like(x)
    z.copy_(y)
    z.mul_(x)
    return z


@pytest.mark.parametrize("name,f", OPS, ids=[o[0] for o in OPS])
def test_op_rules_match_torch_func(name, f):
    g = torch.Generator().manual_seed(6)
    x = torch.rand(3, 5, 7, generator=g, dtype=torch.float64) + 0.1 if name == "elementwise" else \
        torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    K = 3
    T = torch.randn(K, *x.shape, generator=g, dtype=torch.float64)
    out, jv = fwdllm.func.batched_jvp(f, (x,), (T,))
    for k in range(K):
        rout, rj = torch.func.jvp(f, (x,), (T[k],))
        torch.testing.assert_close(out, rout)
        torch.testing.assert_close(jv[k], rj)


def test_has_aux_and_pytree_outputs():
    x = torch.randn(4, dtype=torch.float64)
    t = torch.randn(4, dtype=torch.float64)

    def f(x):
        return {"a": x.sin(), "b": (x * 2, x.sum())}, x.cos()
    out, j, aux = fwdllm.func.jvp(f, (x,), (t,), has_aux=True)
    rout, rj, raux = torch.func.jvp(f, (x,), (t,), has_aux=True)
    torch.testing.assert_close(j, rj)
    torch.testing.assert_close(aux, raux)
    # an output that does not depend on the inputs has zero tangent
    o, jz = fwdllm.func.jvp(lambda x: torch.ones(3), (x,), (t,))
    assert torch.equal(jz, torch.zeros(3))


def test_generic_rule_counts_unknown_ops():
    x = torch.randn(5, dtype=torch.float64)
    STATS.reset()
    out, j = fwdllm.func.jvp(lambda x: torch.special.i0(x) + torch.atan2(x, x + 2), (x,), (torch.ones(5).double(),))
    rout, rj = torch.func.jvp(lambda x: torch.special.i0(x) + torch.atan2(x, x + 2), (x,), (torch.ones(5).double(),))
    torch.testing.assert_close(j, rj)
    assert STATS.counts["generic"]["special_i0"] == 1 and STATS.counts["generic"]["atan2"] == 1


def test_errors_name_the_problem():
    x = torch.randn(3)
    with pytest.raises(TypeError, match="tuple of tensors"):
        fwdllm.func.jvp(torch.sin, 3.0, (x,))
    with pytest.raises(ValueError, match="same length"):
        fwdllm.func.jvp(torch.sin, (x,), (x, x))
    with pytest.raises(ValueError, match="shape"):
        fwdllm.func.jvp(torch.sin, (x,), (torch.randn(4),))
    with pytest.raises(ValueError, match=r"\(K, 3\)"):
        fwdllm.func.batched_jvp(torch.sin, (x,), (x,))
    with pytest.raises(ValueError, match="dtype"):
        fwdllm.func.batched_jvp(torch.sin, (x,), (torch.randn(2, 3, dtype=torch.float64),))
    with pytest.raises(fwdllm.UnsupportedModelError, match="dropout"):
        fwdllm.func.jvp(lambda x: F.dropout(x, 0.5, training=True), (x,), (x,))
    with pytest.raises(fwdllm.UnsupportedModelError, match="dropout_p"):
        q = torch.randn(1, 1, 2, 4)
        fwdllm.func.jvp(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.1), (q,), (q,))

    class NoForwardAD(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.from_numpy(x.detach().numpy() * 2)

        @staticmethod
        def backward(ctx, g):
            return g * 2
    with pytest.raises(fwdllm.UnsupportedModelError, match="from_numpy|numpy"):
        fwdllm.func.jvp(lambda x: NoForwardAD.apply(x), (x,), (x,))


def test_in_place_activation_never_overwrites_a_kept_tangent():
    """The engine computes an activation's tangent in place on its input's only when the model has
    dropped the input; here the pre-activation and a view of it are kept and used afterwards."""
    x = torch.randn(3, 4, dtype=torch.float64)

    def f(W):
        u = F.linear(x, W)
        a = F.gelu(u)
        v = u.view(-1)
        return F.linear(a, W @ W.T) + u, v, F.silu(F.linear(x, W)) * u
    W = torch.randn(5, 4, dtype=torch.float64)
    T = torch.randn(2, 5, 4, dtype=torch.float64)
    out, jv = fwdllm.func.batched_jvp(f, (W,), (T,))
    for k in range(2):
        _, rj = torch.func.jvp(f, (W,), (T[k],))
        for a, b in zip(jv, rj):
            torch.testing.assert_close(a[k], b)
