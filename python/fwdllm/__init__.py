"""fwdllm: backprop-free (forward-gradient) fine-tuning of transformer language models.

This layer depends on :mod:`fwdkernels` (never the reverse). For now it holds the one-layer demo
(``python -m fwdllm.demo``); dual models, the estimators and the federated driver build on it.
"""
__version__ = "0.1.0"
