"""Compile the Triton kernels for real GPUs (no device needed: Triton's compiler and bundled ptxas).
Run as a script with TRITON_INTERPRET unset (the interpreter replaces kernels by Python functions).
Exit 0: all compiled; 3: Triton's CUDA toolchain is unavailable here; anything else: a kernel failed."""
import importlib
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

L = importlib.import_module("fwdkernels.lora_linear_dual")
P = importlib.import_module("fwdkernels.perturb")


def comp(fn, signature, constexprs, arch):
    try:
        return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))
    except (FileNotFoundError, PermissionError) as e:
        print(f"toolchain unavailable: {e}")
        sys.exit(3)


def main():
    pk, wk = P._triton_kernels()
    for arch in (80, 90):
        for dist in (0, 1):
            k = comp(pk, {"out_ptr": "*fp32", "seed": "i64", "offset": "i64", "n": "i64", "DIST": "constexpr",
                          "BLOCK": "constexpr"}, {"DIST": dist, "BLOCK": 1024}, arch)
            assert "mul.hi.u32" in k.asm["ptx"], "Philox's umulhi missing from the PTX"
        comp(wk, {"out_ptr": "*i64", "seed": "i64", "offset": "i64", "n": "i64", "BLOCK": "constexpr"},
             {"BLOCK": 1024}, arch)
    down, main_k, _ = L._triton_kernels()
    for dt in ("fp32", "bf16"):
        sig = dict(x_ptr=f"*{dt}", xd_ptr=f"*{dt}", a_ptr=f"*{dt}", ad_ptr=f"*{dt}", seeds_ptr="*i64",
                   hs_ptr="*fp32", us_ptr="*fp32", M="i32", D_IN="i32", R="i32", scaling="fp32", offset_A="i64")
        sig.update({k: "constexpr" for k in ("HAS_XDOT", "HAS_ADOT", "DIST", "IEEE", "BM", "BK", "BR")})
        comp(down, sig, dict(HAS_XDOT=True, HAS_ADOT=dt == "bf16", DIST=0, IEEE=dt == "fp32", BM=64, BK=64, BR=16), 90)
        sig = dict(x_ptr=f"*{dt}", xd_ptr=f"*{dt}", w_ptr=f"*{dt}", bias_ptr=f"*{dt}", b_ptr=f"*{dt}",
                   bd_ptr=f"*{dt}", biasd_ptr=f"*{dt}", seeds_ptr="*i64", hs_ptr="*fp32", us_ptr="*fp32",
                   y_ptr=f"*{dt}", yd_ptr=f"*{dt}", M="i32", D_IN="i32", D_OUT="i32", R="i32", K="i32",
                   offset_B="i64", offset_bias="i64")
        sig.update({k: "constexpr" for k in ("HAS_XDOT", "HAS_BIAS", "HAS_LORA", "HAS_BDOT", "BIAS_TRAIN",
                                             "HAS_BIASDOT", "DIST", "IEEE", "BM", "BN", "BK", "BR")})
        for has_xdot, lora in ((True, True), (False, dt == "fp32")):
            comp(main_k, sig, dict(HAS_XDOT=has_xdot, HAS_BIAS=True, HAS_LORA=lora, HAS_BDOT=False,
                                   BIAS_TRAIN=True, HAS_BIASDOT=False, DIST=1, IEEE=dt == "fp32", BM=128,
                                   BN=128, BK=32, BR=16), 90)
    A = importlib.import_module("fwdkernels.attention_dual")
    att, _ = A._triton_kernels()
    for dt in ("fp32", "bf16"):
        sig = {n: f"*{dt}" for n in ("q_ptr", "k_ptr", "v_ptr", "qd_ptr", "kd_ptr", "vd_ptr", "o_ptr", "od_ptr")}
        sig.update(mask_ptr="*fp32", bacc_ptr="*fp32", cacc_ptr="*fp32", sm_b="i64", sm_h="i64", sm_l="i64",
                   sm_s="i64", H="i32", HKV="i32", L="i32", S="i32", D="i32", K="i32", scale="fp32", SQ="i64",
                   SKV="i64", SC="i64")
        sig.update({k: "constexpr" for k in ("HAS_QD", "HAS_KD", "HAS_VD", "HAS_MASK", "CAUSAL", "IEEE", "BM", "BN",
                                             "BD")})
        for arch, full, (BM, BN, BD) in ((80, True, (64, 64, 64)), (90, False, (64, 32, 128)),
                                         (90, True, (32, 32, 256))):
            comp(att, sig, dict(HAS_QD=full, HAS_KD=True, HAS_VD=full, HAS_MASK=full, CAUSAL=not full,
                                IEEE=dt == "fp32", BM=BM, BN=BN, BD=BD), arch)
    print("all Triton kernels compiled for sm_80/sm_90")


if __name__ == "__main__":
    main()
