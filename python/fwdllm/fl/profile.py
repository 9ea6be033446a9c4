"""The PEFT profiler (``fwdllm profile``): which PEFT method do forward gradients serve best here?

For each PEFT kind (LoRA, adapters, BitFit) on the config's model, layers and dataset, over a few
training batches: the backprop gradient g (exact, float32) and the forward-gradient estimate ĝ from
K seeded directions per perturbation group (one dual forward per group), then

- cos(ĝ_enc, g_enc): alignment of the encoder group's estimate (the part that fine-tunes the encoder;
  for K directions in d dimensions it is about sqrt(K / (K + d)), so fewer trainables align better);
- cos(ĝ_head, g_head) for the head group;
- ||g_head||^2 / ||g_enc||^2: why the head gets directions of its own;
- the seconds of one forward-gradient step (all groups) and the trainable counts.

The recommendation maximises cos(ĝ_enc, g_enc)^2 per second of a step: the expected progress of an
SGD step on a smooth loss scales with cos^2 (the share of the estimate that is signal), so this is
progress per unit of client compute. ``peft.kind = "auto"`` in a training config runs the profiler
first and trains with its choice.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch

from .. import dual as fdual
from . import data as fdata
from .model import build_model, perturbation_groups

__all__ = ["profile", "format_profile"]

KINDS = ("lora", "adapter", "bitfit")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


def profile(cfg: dict, kinds=KINDS, batches: int = 3, K: int | None = None, ds=None) -> list[dict]:
    """One row per PEFT kind: {kind, trainable, encoder, head, cos_encoder, cos_head, head_over_encoder,
    step_s, score}. ``K`` defaults to the config's fl.K (the head group uses fl.K_head)."""
    torch.set_num_threads(cfg["threads"])
    d = cfg["data"]
    if ds is None:
        ds = fdata.load_dataset(d["path"] or None, d["text_col"], d["label_col"], seed=cfg["seed"],
                                test_size=d["test_size"])
    K = K or cfg["fl"]["K"]
    K_head = cfg["fl"]["K_head"] or K
    rows = []
    for kind in kinds:
        c = copy.deepcopy(cfg)
        c["peft"]["kind"] = kind
        model, tok, dm = build_model(c, ds.num_classes)
        groups = [g for g in perturbation_groups(model, dm, K, K_head, True)]
        groups = [("encoder" if n == "all" else n, lay, k) for n, lay, k in groups]
        it = iter(fdata.batches(ds, tok, d["batch_size"], max_length=c["model"]["max_length"], seed=cfg["seed"]))
        cos = {g[0]: [] for g in groups}
        ratio, times = [], []
        for bi in range(batches):
            b = next(it)
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                out = model(**b)
                out.loss.backward()
            g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                           for _, p in dm.layout.params])
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            est = {}
            for gi, (name, lay, k) in enumerate(groups):
                seeds = torch.tensor([fdual.fk.derive_seed(cfg["seed"], 99, bi, gi, j) for j in range(k)])
                _, jv = fdual.forward_gradient(dm, b, seeds, cfg["fl"]["dist"], group=lay)
                est[name] = fdual.combine_directions(seeds.tolist(), (jv.double() / k).tolist(), dm.numel,
                                                     cfg["fl"]["dist"], lay.mask())
            times.append(time.perf_counter() - t0)
            for name, lay, _ in groups:
                m = lay.mask()
                gm = g if m is None else g[m]
                em = est[name] if m is None else est[name][m]
                cos[name].append(_cos(em, gm))
            if len(groups) == 2:
                m_enc, m_head = groups[0][1].mask(), groups[1][1].mask()
                ratio.append(float(g[m_head].square().sum()) / max(float(g[m_enc].square().sum()), 1e-30))
        n_enc = sum(p.numel() for _, p in groups[0][1].params) if groups[0][0] == "encoder" else 0
        step = float(np.median(times))
        ce = float(np.mean(cos["encoder"])) if "encoder" in cos else float("nan")
        rows.append({
            "kind": kind, "trainable": dm.numel, "encoder": n_enc, "head": dm.numel - n_enc,
            "cos_encoder": ce, "cos_head": float(np.mean(cos["head"])) if "head" in cos else float("nan"),
            "head_over_encoder": float(np.mean(ratio)) if ratio else float("nan"),
            "step_s": step, "score": (ce * ce / step) if np.isfinite(ce) else float("-inf"),
        })
        del model, dm
    best = max(rows, key=lambda r: r["score"])
    for r in rows:
        r["recommended"] = r is best
    return rows


def format_profile(rows: list[dict], K: int) -> str:
    head = (f"{'PEFT':8} {'trainable':>10} {'encoder':>9} {'head':>6} {'cos enc':>8} {'cos head':>9} "
            f"{'|g_h|²/|g_e|²':>14} {'step s':>7} {'cos²/s':>8}")
    lines = [f"forward-gradient alignment with backprop, K = {K} directions per group", head]
    for r in rows:
        lines.append(f"{r['kind']:8} {r['trainable']:>10,} {r['encoder']:>9,} {r['head']:>6,} {r['cos_encoder']:>8.3f} "
                     f"{r['cos_head']:>9.3f} {r['head_over_encoder']:>14.1f} {r['step_s']:>7.3f} {r['score']:>8.4f}"
                     + ("  <- recommended" if r["recommended"] else ""))
    return "\n".join(lines)
