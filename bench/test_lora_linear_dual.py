"""Dual LoRA linear: fused kernels vs torch.func.jvp + vmap vs autograd vs the matmul floor.

Shapes: 384->384 and 384->1536 (MiniLM), 4096->4096 (LLaMA-7B); M = 8 x 128 tokens; r = 8;
K in {1, 4, 8, 16}. Every implementation computes the layer's primal output and K tangent streams
(autograd: forward + backward of the same layer, for scale; floor: one plain matmul of (1+K)M rows,
the same multiply-adds with no LoRA and no perturbations). Perturbations for the jvp baseline are
materialised before timing (in its favour). `make bench` runs this and writes bench/RESULTS.md.
Set FWDLLM_BENCH_SHAPES=small to skip 4096x4096.
"""
import os

import pytest
import torch

import fwdkernels as fk
from memory import peak_extra_bytes

M, R, ALPHA = 8 * 128, 8, 16
SHAPES = [(384, 384), (384, 1536), (4096, 4096)]
if os.environ.get("FWDLLM_BENCH_SHAPES") == "small":
    SHAPES = SHAPES[:2]
KS = [1, 4, 8, 16]
IMPLS = ["fused_cpp", "jvp_vmap", "autograd_fwd_bwd", "matmul_floor"]
if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available():
    IMPLS.insert(1, "fused_triton")


def _layer(d_in, d_out, device):
    import peft

    base = torch.nn.Linear(d_in, d_out, bias=True)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights=False)
    layer = peft.tuners.lora.Linear(base, "default", cfg, r=R, lora_alpha=ALPHA, init_lora_weights=False)
    return layer.to(device)


def make_case(impl, d_in, d_out, K, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, d_in, generator=g).to(device)
    x_dot = torch.randn(K, M, d_in, generator=g).to(device)
    seeds = torch.tensor([fk.derive_seed(1, k) for k in range(K)], device=device)
    if impl == "matmul_floor":
        X = torch.randn((1 + K) * M, d_in, generator=g).to(device)
        W = torch.randn(d_out, d_in, generator=g).to(device)
        return lambda: X @ W.T, (1 + K) * M * d_out * 4
    layer = _layer(d_in, d_out, device)
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    s = layer.scaling["default"]
    out_bytes = (1 + K) * M * d_out * 4
    if impl.startswith("fused"):
        backend = impl.split("_")[1]
        return (lambda: fk.lora_linear_dual(x, x_dot, W, b, A, B, s, seeds, 0, A.numel(), backend=backend)), out_bytes
    if impl == "jvp_vmap":
        VA = torch.stack([fk.perturb(int(sd), A.numel(), 0) for sd in seeds]).view(K, *A.shape).to(device)
        VB = torch.stack([fk.perturb(int(sd), B.numel(), A.numel()) for sd in seeds]).view(K, *B.shape).to(device)
        names = ("lora_A.default.weight", "lora_B.default.weight")
        params = {n: p.detach() for n, p in layer.named_parameters()}

        def f(xx, a, bb):
            return torch.func.functional_call(layer, {**params, names[0]: a, names[1]: bb}, (xx,))

        def run():
            return torch.func.vmap(lambda xd, va, vb: torch.func.jvp(f, (x, A, B), (xd, va, vb)))(x_dot, VA, VB)

        return run, out_bytes
    if impl == "autograd_fwd_bwd":
        gy = torch.randn(M, d_out, generator=g).to(device)
        for p in layer.parameters():
            p.requires_grad_(False)
        layer.lora_A["default"].weight.requires_grad_(True)
        layer.lora_B["default"].weight.requires_grad_(True)

        def run():
            layer.zero_grad(set_to_none=True)
            y = layer(x)
            (y * gy).sum().backward()
            return y

        return run, M * d_out * 4
    raise ValueError(impl)


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", IMPLS)
def test_lora_linear_dual(benchmark, impl, shape, K):
    d_in, d_out = shape
    device = "cuda" if impl == "fused_triton" else "cpu"
    fn, out_bytes = make_case(impl, d_in, d_out, K, device)
    benchmark.group = f"{d_in}x{d_out} K={K}"
    benchmark.extra_info.update(impl=impl, d_in=d_in, d_out=d_out, K=K, M=M, r=R, out_bytes=out_bytes,
                                threads=torch.get_num_threads())
    if device == "cpu":
        benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(fn)
    rounds = 3 if d_in >= 4096 else 7
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
