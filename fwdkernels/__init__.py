"""fwdkernels: fused dual-number (forward-mode) kernels with seeded perturbations.

Ops (each also registered as ``torch.ops.fwdkernels.<name>``):
  perturb, philox_words, derive_seed   seeded Philox4x32-10 perturbations (perturb.py)
  lora_linear_dual                     fused dual (LoRA / BitFit / frozen) linear (lora_linear_dual.py)

Backends (reference / cpp / triton / cuda) are chosen per call; see fwdkernels.backends.
"""
from . import _ext
from .backends import available_backends
from .perturb import derive_seed, perturb, philox_words, seed_to_int64
from .lora_linear_dual import lora_linear_dual, lora_linear_dual_op

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "derive_seed",
    "lora_linear_dual",
    "perturb",
    "philox_words",
    "seed_to_int64",
]
