"""Server-side statistics of the FwdLLM protocol, computed from (seed, jvp) pairs alone.

Forward-gradient estimate from N perturbations (uploads pooled, each perturbation weighted by its
client's share of examples): g = sum_i w_i jvp_i v_i, sum_i w_i = 1, v_i = perturb(seed_i).

Variance-controlled pacing needs the variance of g. With the per-perturbation estimates
g_i = jvp_i v_i (equal weights w_i = 1/N), the unbiased estimate of the total variance of the mean is

    var(g) = tr Cov(g) = (sum_i ||g_i||^2 - N ||g||^2) / (N (N - 1)),   ||g_i||^2 = jvp_i^2 ||v_i||^2,

computable from the pairs and one reconstruction of g. The pacing statistic is the relative variance
var(g) / (||g||^2 - var(g)), an estimate of noise over signal (scale-free: it depends on neither the
learning rate nor the loss scale, and falls as 1/N); the server asks for more perturbations while it
is above the threshold. (The published FwdLLM code instead
compares the means of two halves of one client's estimates on one tensor; ours uses every pair.)

Discriminative perturbation sampling keeps, among candidate seeds, those whose perturbation has the
highest cosine similarity with the previous round's gradient estimate (rebuilt from its pairs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import fwdkernels as fk

from ..dual import combine_directions


def direction(seed: int, numel: int, dist: str = "rademacher") -> torch.Tensor:
    return fk.perturb(int(seed), numel, 0, dist)


def combine(seeds, coefficients, numel: int, dist: str = "rademacher", mask: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j coefficients[j] v(seeds[j]): (numel,) float32, restricted to ``mask`` (a perturbation
    group's elements) when given (fwdllm.dual.combine_directions)."""
    return combine_directions(np.asarray(seeds).tolist(), np.asarray(coefficients, dtype=np.float64).tolist(),
                              numel, dist, mask)


@dataclass
class Aggregate:
    """A pooled forward-gradient estimate and its statistics."""
    gradient: torch.Tensor        # (numel,) g
    seeds: np.ndarray             # (N,) the perturbations used
    coefficients: np.ndarray      # (N,) w_i jvp_i: g = sum coefficients[i] v_i
    variance: float               # estimate of tr Cov(g)
    relative_variance: float      # variance / (||g||^2 - variance) (inf when the signal estimate is <= 0)
    num_perturbations: int


def aggregate(uploads, numel: int, dist: str = "rademacher", mask: torch.Tensor | None = None) -> Aggregate:
    """Pool uploads [(seeds (K_c,), jvps (K_c,), num_examples), ...] into one estimate (of one
    perturbation group's gradient when ``mask`` ((numel,) bool) restricts the directions).

    Client c's perturbations each get weight (n_c / sum n) / K_c. The variance statistic treats the N
    pooled per-perturbation estimates as exchangeable (exact when every client has the same n/K).
    """
    if not uploads:
        raise ValueError("aggregate: no upload")
    total = float(sum(n for _, _, n in uploads))
    if total <= 0:
        raise ValueError("aggregate: uploads hold no example")
    seeds, coef, jv_all = [], [], []
    for s, j, n in uploads:
        s, j = np.asarray(s, np.int64), np.asarray(j, np.float64)
        if s.shape != j.shape or s.ndim != 1 or s.size == 0:
            raise ValueError(f"aggregate: seeds {s.shape} and jvps {j.shape} must be equal non-empty 1-D arrays")
        seeds.append(s)
        coef.append(j * (n / total) / s.size)
        jv_all.append(j)
    seeds, coef, jv = np.concatenate(seeds), np.concatenate(coef), np.concatenate(jv_all)
    g = combine(seeds, coef, numel, dist, mask)
    N = seeds.size
    dim = numel if mask is None else int(mask.sum())
    sq_norm_v = float(dim) if dist == "rademacher" else None
    if N < 2:
        var = float("inf")
    else:
        if sq_norm_v is not None:
            per = jv ** 2 * sq_norm_v
        else:
            per = np.array([float(j) ** 2 * float(_masked(direction(s, numel, dist), mask).double().square().sum())
                            for s, j in zip(seeds.tolist(), jv.tolist())])
        # equal-weight form of the statistic, on the mean (1/N) sum jvp_i v_i (the pooled g itself
        # when every client has the same n/K: skip the second regeneration pass then)
        if np.allclose(coef * N, jv, rtol=1e-12, atol=0):
            g_eq = g.double()
        else:
            g_eq = combine(seeds, jv / N, numel, dist, mask).double()
        var = max(0.0, (float(per.sum()) - N * float(g_eq.square().sum())) / (N * (N - 1)))
    # ||g||^2 overestimates the signal by the variance itself (E||g||^2 = ||E g||^2 + var): divide by
    # the unbiased ||g||^2 - var, so the statistic keeps falling as 1/N instead of saturating at 1.
    signal = float(g.double().square().sum()) - var
    rel = var / signal if signal > 0 else float("inf")
    return Aggregate(g, seeds, coef.astype(np.float32), var, rel, N)


def _masked(v, mask):
    return v if mask is None else v.masked_fill_(~mask, 0.0)


def cosine_with(seeds, reference: torch.Tensor, dist: str = "rademacher", mask: torch.Tensor | None = None) -> np.ndarray:
    """cos(v(seed), reference) for each seed: (len(seeds),) (v restricted to ``mask`` when given)."""
    ref = reference.double()
    rn = float(ref.norm())
    out = np.zeros(len(seeds))
    if rn == 0:
        return out
    for i, s in enumerate(np.asarray(seeds).tolist()):
        v = _masked(direction(s, ref.numel(), dist), mask).double()
        out[i] = float(v @ ref) / (float(v.norm()) * rn)
    return out


def discriminative_select(candidates, keep: int, previous_gradient: torch.Tensor | None,
                          dist: str = "rademacher", mask: torch.Tensor | None = None) -> np.ndarray:
    """The ``keep`` candidate seeds whose perturbations align best with the previous gradient estimate
    (highest cosine; ties and a missing/zero previous gradient keep the first candidates)."""
    candidates = np.asarray(candidates, np.int64)
    if keep < 1 or keep > candidates.size:
        raise ValueError(f"discriminative_select: keep must be in [1, {candidates.size}], got {keep}")
    if previous_gradient is None or float(previous_gradient.norm()) == 0.0:
        return candidates[:keep]
    cos = cosine_with(candidates, previous_gradient, dist, mask)
    order = np.argsort(-cos, kind="stable")
    return candidates[np.sort(order[:keep])]
