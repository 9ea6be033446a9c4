"""fwdllm: backprop-free (forward-gradient) fine-tuning of transformer language models.

- :func:`patch` turns a HF (+ peft) model into a :class:`DualModel` that runs the model's own forward
  through the dual engine (:mod:`fwdllm.engine`), carrying K tangent streams.
- :func:`forward_gradient` gives the loss and the K directional derivatives dL.v_k of seeded
  perturbations in one dual forward; :func:`reconstruct_gradient` turns (seeds, jvps) into ``.grad``.
- :func:`central_difference`: the finite-difference (FwdLLM published code / MeZO) baseline.
- :mod:`fwdllm.func`: ``jvp`` (torch.func.jvp's contract), ``batched_jvp``, ``seeded_jvp``.

This layer depends on :mod:`fwdkernels` (never the reverse).
"""
__version__ = "0.1.0"

from .dual import (  # noqa: E402
    DualModel,
    TrainableLayout,
    UnsupportedModelError,
    central_difference,
    combine_directions,
    forward_gradient,
    patch,
    reconstruct_gradient,
)
from . import arch, engine, func  # noqa: E402
from .adapters import BottleneckAdapter, add_adapters  # noqa: E402

__all__ = ["BottleneckAdapter", "add_adapters", "arch", "DualModel", "TrainableLayout", "UnsupportedModelError",
           "central_difference", "combine_directions", "engine", "forward_gradient", "func", "patch",
           "reconstruct_gradient"]
