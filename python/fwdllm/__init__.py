"""fwdllm: backprop-free (forward-gradient) fine-tuning of transformer language models.

- :func:`patch` turns a HF (+ peft) model into a :class:`DualModel` that carries K tangent streams.
- :func:`forward_gradient` gives the loss and the K directional derivatives dL.v_k of seeded
  perturbations in one dual forward; :func:`reconstruct_gradient` turns (seeds, jvps) into ``.grad``.
- :func:`central_difference`: the finite-difference (FwdLLM published code / MeZO) baseline.
- :mod:`fwdllm.func`: ``jvp``, a drop-in for ``torch.func.jvp``.

This layer depends on :mod:`fwdkernels` (never the reverse).
"""
__version__ = "0.1.0"

from .dual import (  # noqa: E402
    DualModel,
    TrainableLayout,
    UnsupportedModelError,
    central_difference,
    forward_gradient,
    patch,
    reconstruct_gradient,
)
from . import func  # noqa: E402
from .adapters import BottleneckAdapter, add_adapters  # noqa: E402

__all__ = ["BottleneckAdapter", "add_adapters", "DualModel", "TrainableLayout", "UnsupportedModelError", "central_difference", "forward_gradient",
           "func", "patch", "reconstruct_gradient"]
