"""Server statistics from (seed, jvp) pairs: pooled estimate, the variance statistic against the
empirical variance of repeated draws, and discriminative sampling."""
import numpy as np
import pytest
import torch

import fwdkernels as fk
from fwdllm.fl import aggregate as A

D = 200


def _true_grad():
    return torch.randn(D, generator=torch.Generator().manual_seed(0))


def _pairs(g, seeds, dist="rademacher"):
    return np.array([float(fk.perturb(int(s), D, 0, dist) @ g) for s in seeds])  # exact jvps of a linear loss


def test_aggregate_weights_clients_by_examples():
    g = _true_grad()
    s1, s2 = np.arange(1, 5), np.arange(100, 108)
    agg = A.aggregate([(s1, _pairs(g, s1), 30), (s2, _pairs(g, s2), 10)], D)
    manual = (0.75 / 4) * sum(float(j) * fk.perturb(int(s), D) for s, j in zip(s1, _pairs(g, s1))) + \
             (0.25 / 8) * sum(float(j) * fk.perturb(int(s), D) for s, j in zip(s2, _pairs(g, s2)))
    torch.testing.assert_close(agg.gradient, manual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(A.combine(agg.seeds, agg.coefficients, D), agg.gradient, rtol=1e-5, atol=1e-5)
    assert agg.num_perturbations == 12


@pytest.mark.parametrize("dist", ["rademacher", "normal"])
def test_variance_statistic_matches_repeated_draws(dist):
    """E[var estimate] = tr Cov(g) for the mean of N forward gradients (within sampling error)."""
    g = _true_grad()
    N, reps = 16, 150
    ests, stats = [], []
    for r in range(reps):
        seeds = np.array([fk.derive_seed(5, r, i) for i in range(N)])
        agg = A.aggregate([(seeds, _pairs(g, seeds, dist), 1)], D, dist)
        ests.append(agg.gradient.double())
        stats.append(agg.variance)
    E = torch.stack(ests)
    empirical = float((E - g.double()).square().sum(1).mean())  # the estimator is unbiased: E g_hat = g
    assert np.mean(stats) == pytest.approx(empirical, rel=0.15)
    # more perturbations, lower relative variance (~ 1/N)
    seeds = np.array([fk.derive_seed(6, i) for i in range(256)])
    big = A.aggregate([(seeds, _pairs(g, seeds, dist), 1)], D, dist)
    small = np.median([s / max(float(e.square().sum()) - s, 1e-12) for s, e in zip(stats, ests)])
    assert big.relative_variance < small / 5
    assert big.relative_variance == pytest.approx(D / 256, rel=0.5)  # ~ d / N for Rademacher


def test_discriminative_select_prefers_aligned_directions():
    g = _true_grad()
    cands = np.array([fk.derive_seed(9, i) for i in range(100)])
    kept = A.discriminative_select(cands, 10, g)
    cos_all = A.cosine_with(cands, g)
    cos_kept = A.cosine_with(kept, g)
    assert len(kept) == 10 and set(kept.tolist()) <= set(cands.tolist())
    assert cos_kept.min() >= np.sort(cos_all)[-10] - 1e-12
    assert np.array_equal(A.discriminative_select(cands, 3, None), cands[:3])
    with pytest.raises(ValueError, match="keep must be"):
        A.discriminative_select(cands, 0, g)


def test_aggregate_rejects_bad_input():
    with pytest.raises(ValueError, match="no upload"):
        A.aggregate([], D)
    with pytest.raises(ValueError, match="equal non-empty"):
        A.aggregate([(np.arange(3), np.zeros(2), 1)], D)
    with pytest.raises(ValueError, match="no example"):
        A.aggregate([(np.arange(3), np.zeros(3), 0)], D)
