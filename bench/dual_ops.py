"""Small dual ops: the fused cpp kernels (csrc/core/dual_ops.cpp) vs the torch composites (reference backend).

    python bench/dual_ops.py [--threads 1] [--reps 15] [--out bench/.dual_ops.md]

Shapes are the ones a forward-gradient step meets: MiniLM (8 sentences x 64 tokens, d = 384, MLP 1536,
K = 16) and SmolLM2-135M (2 x 64 tokens, d = 576, MLP 1536, 9 heads x 64, vocabulary 49152, K = 8).
Each row times one call producing the primal and all K tangent streams (median of --reps after a warm-up,
both backends interleaved in one process) and reports the ratio reference / cpp.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fwdkernels as fk


def cases(dtype):
    g = torch.Generator().manual_seed(0)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype)

    out = []
    K, R, d, f = 16, 8 * 64, 384, 1536  # MiniLM
    x, xd, w, b = r(R, d, scale=2), r(K, R, d), r(d), r(d)
    out.append(("layer_norm_dual MiniLM (512x384, K=16)", lambda be: fk.layer_norm_dual(x, xd, w, b, 1e-12, backend=be)))
    h, hd = r(R, f, scale=2), r(K, R, f)
    out.append(("gelu_dual MiniLM (512x1536, K=16)", lambda be: fk.gelu_dual(h, hd, backend=be)))
    p, pd = r(8, d), r(K, 8, d)
    out.append(("tanh_dual pooler (8x384, K=16)", lambda be: fk.tanh_dual(p, pd, backend=be)))
    K, R, d, f, H, D, V = 8, 2 * 64, 576, 1536, 9, 64, 49152  # SmolLM2-135M
    x2, xd2, w2 = r(R, d, scale=2), r(K, R, d), r(d)
    out.append(("rms_norm_dual SmolLM2 (128x576, K=8)", lambda be: fk.rms_norm_dual(x2, xd2, w2, 1e-5, backend=be)))
    gt, gd, up, ud = r(R, f, scale=2), r(K, R, f), r(R, f), r(K, R, f)
    out.append(("gated_mlp_act_dual SmolLM2 (128x1536, K=8)",
                lambda be: fk.gated_mlp_act_dual(gt, gd, up, ud, backend=be)))
    q = r(2, 64, H, D).transpose(1, 2)            # (B, H, L, D) view of the projection's output
    qd = r(K, 2, 64, H, D).transpose(2, 3)
    ang = torch.rand(2, 64, D, generator=g) * 6
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    out.append(("rotary_dual SmolLM2 q (2x9x64x64 strided, K=8)", lambda be: fk.rotary_dual(q, qd, cos, sin, backend=be)))
    lg, lgd = r(R, V, scale=3), r(K, R, V)
    lab = torch.randint(0, V, (R,), generator=g)
    out.append(("cross_entropy_dual SmolLM2 LM head (128x49152, K=8)",
                lambda be: fk.cross_entropy_dual(lg, lgd, lab, backend=be)))
    return out


def median_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if fk._ext.C is None:
        raise SystemExit(f"fwdkernels._C is not loaded: {fk._ext.LOAD_ERROR}")
    lines = [f"| op (shape) | dtype | reference ms | cpp ms | reference / cpp |", "|---|---|---|---|---|"]
    for dtype in (torch.float32, torch.bfloat16):
        for name, fn in cases(dtype):
            t = {}
            for _ in range(2):  # interleave the backends so drift on a shared machine hits both
                for be in ("reference", "cpp"):
                    t.setdefault(be, []).append(median_time(lambda: fn(be), args.reps))
            ref, cpp = min(t["reference"]), min(t["cpp"])
            lines.append(f"| {name} | {str(dtype).split('.')[-1]} | {ref * 1e3:.2f} | {cpp * 1e3:.2f} | {ref / cpp:.1f}x |")
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
