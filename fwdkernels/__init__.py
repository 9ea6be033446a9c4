"""fwdkernels: fused dual-number (forward-mode) kernels with seeded perturbations.

Ops (each also registered as ``torch.ops.fwdkernels.<name>``):
  perturb, philox_words, derive_seed   seeded Philox4x32-10 perturbations (perturb.py)
  lora_linear_dual                     fused dual (LoRA / BitFit / frozen) linear (lora_linear_dual.py)
  attention_dual                       fused dual (forward-mode) attention, flash style (attention_dual.py)
Composite dual ops in plain PyTorch (dual_ops.py; not custom ops): layer/RMS norm, GELU, SiLU, gated
MLP, rotary, embedding, residual add, small dense, cross-entropy / causal-LM / MSE losses.

Backends (reference / cpp / triton / cuda) are chosen per call; see fwdkernels.backends.
"""
from . import _ext, dual_ops
from .backends import available_backends, fallback_report, reset_fallback_report
from .perturb import derive_seed, perturb, perturb_combine, philox_words, seed_to_int64
from .lora_linear_dual import lora_linear_dual, lora_linear_dual_op
from .attention_dual import attention_dual, attention_dual_op
from .dual_ops import (add_dual, causal_lm_loss_dual, cross_entropy_dual, embedding_dual, gated_mlp_act_dual,
                       gelu_dual, layer_norm_dual, linear_dual, mse_loss_dual, rms_norm_dual, rotary_dual,
                       silu_dual, tanh_dual)

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "fallback_report",
    "reset_fallback_report",
    "attention_dual",
    "derive_seed",
    "lora_linear_dual",
    "perturb",
    "perturb_combine",
    "philox_words",
    "seed_to_int64",
] + list(dual_ops.__all__)
