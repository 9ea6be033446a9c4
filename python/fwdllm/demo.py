"""One-layer forward-gradient demo (``make run``).

A LoRA-adapted linear layer (384 -> 384, r = 8, 8 x 128 tokens) learns a teacher's LoRA update using
forward gradients only: each step draws K seeds, runs ONE fused dual forward that carries K tangent
streams (fwdkernels.lora_linear_dual), turns the K directional derivatives dL.v_k into the forward
gradient (1/K) sum_k (dL.v_k) v_k, regenerating each v_k from its seed, and takes an SGD step. It
prints what it measured: the exactness of the directional derivatives against torch.func.jvp, the
alignment of the estimate with the backprop gradient, the loss curve, and the time of the fused dual
forward against torch.func.jvp + vmap.
"""
from __future__ import annotations

import argparse
import time

import torch

import fwdkernels as fk


def _median_time(fn, reps=5):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--k", type=int, default=64, help="perturbations per step")
    ap.add_argument("--lr", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)

    d_in, d_out, r, M, alpha = 384, 384, 8, 8 * 128, 16.0
    s = alpha / r
    W = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    x = torch.randn(M, d_in, generator=g)
    A_t = torch.randn(r, d_in, generator=g) / d_in**0.5
    B_t = torch.randn(d_out, r, generator=g) / r**0.5
    y_target = x @ W.T + s * (x @ A_t.T) @ B_t.T
    A = torch.randn(r, d_in, generator=g) / d_in**0.5
    B = torch.randn(d_out, r, generator=g) / r**0.5 * 0.1
    n_A, n_B = A.numel(), B.numel()
    off_A, off_B, n_total = 0, n_A, n_A + n_B  # flattening order: lora_A then lora_B
    backend = fk.lora_linear_dual_op.choose("cpu", x=x)
    print(f"fwdkernels backend: {backend}; trainable parameters: {n_total}; K = {args.k} per step")

    def loss_and_jvps(A, B, seeds):
        y, y_dot = fk.lora_linear_dual(x, None, W, None, A, B, s, seeds, off_A, off_B)
        res = y - y_target
        loss = (res * res).mean()
        jvps = 2.0 * (res.unsqueeze(0) * y_dot).mean(dim=(1, 2))  # dL.v_k, (K,)
        return loss, jvps

    def loss_fn(A, B):
        res = x @ W.T + s * (x @ A.T) @ B.T - y_target
        return (res * res).mean()

    def direction(seed):
        return fk.perturb(seed, n_total)

    # 1. exactness: fused directional derivatives vs torch.func.jvp in float64
    seeds = torch.tensor([fk.derive_seed(args.seed, 0, j) for j in range(8)])
    B_probe = torch.randn(d_out, r, generator=g) * 0.01
    _, jvps = loss_and_jvps(A, B_probe, seeds)
    ref = []
    for k in range(8):
        v = direction(int(seeds[k])).double()
        vA, vB = v[:n_A].view(r, d_in), v[n_A:].view(d_out, r)
        f64 = lambda a, b: ((x.double() @ W.double().T + s * (x.double() @ a.T) @ b.T - y_target.double()) ** 2).mean()  # noqa: E731
        ref.append(torch.func.jvp(f64, (A.double(), B_probe.double()), (vA, vB))[1])
    ref = torch.stack(ref)
    rel = ((jvps.double() - ref).norm() / ref.norm()).item()
    print(f"directional derivatives vs torch.func.jvp (float64): relative error {rel:.2e}")

    # 2. alignment of the forward gradient with the backprop gradient, as K grows
    Ag, Bg = A.clone().requires_grad_(), B_probe.clone().requires_grad_()
    loss_fn(Ag, Bg).backward()
    true_g = torch.cat([Ag.grad.flatten(), Bg.grad.flatten()])
    for K in (8, 64, 512):
        seeds = torch.tensor([fk.derive_seed(args.seed, 1, j) for j in range(K)])
        _, jvps = loss_and_jvps(A, B_probe, seeds)
        est = sum(jvps[k] * direction(int(seeds[k])) for k in range(K)) / K
        cos = torch.nn.functional.cosine_similarity(est, true_g, dim=0).item()
        print(f"  K = {K:4d}: cosine(forward gradient, backprop gradient) = {cos:.3f}"
              f"  (sqrt(K/d) = {(K / n_total) ** 0.5:.3f})")

    # 3. training with forward gradients only
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        seeds = torch.tensor([fk.derive_seed(args.seed, 2, step, j) for j in range(args.k)])
        loss, jvps = loss_and_jvps(A, B, seeds)
        losses.append(loss.item())
        est = torch.zeros(n_total)
        for k in range(args.k):
            est += jvps[k] * direction(int(seeds[k]))
        est /= args.k
        A -= args.lr * est[:n_A].view_as(A)
        B -= args.lr * est[n_A:].view_as(B)
    final = loss_fn(A, B).item()
    dt = time.perf_counter() - t0
    print(f"training: loss {losses[0]:.5f} -> {final:.5f} in {args.steps} steps of K = {args.k} ({dt:.1f} s)")

    # 4. speed of one dual forward at K = 8: fused kernel vs torch.func.jvp + vmap
    K = 8
    seeds = torch.tensor([fk.derive_seed(args.seed, 3, j) for j in range(K)])
    vs = torch.stack([direction(int(sd)) for sd in seeds])
    VA, VB = vs[:, :n_A].reshape(K, r, d_in), vs[:, n_A:].reshape(K, d_out, r)
    fwd = lambda a, b: x @ W.T + s * (x @ a.T) @ b.T  # noqa: E731
    t_fused = _median_time(lambda: fk.lora_linear_dual(x, None, W, None, A, B, s, seeds, off_A, off_B))
    t_vmap = _median_time(lambda: torch.func.vmap(lambda va, vb: torch.func.jvp(fwd, (A, B), (va, vb)))(VA, VB))
    t_plain = _median_time(lambda: fwd(A, B))
    print(f"dual forward, K = {K}, {M} tokens, {args.threads} thread(s): fused {t_fused * 1e3:.1f} ms, "
          f"torch.func.jvp+vmap {t_vmap * 1e3:.1f} ms ({t_vmap / t_fused:.1f}x), plain forward {t_plain * 1e3:.1f} ms")
    ok = rel < 1e-4 and final < losses[0]
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
