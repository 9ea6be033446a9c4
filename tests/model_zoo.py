"""Tiny random configs of every architecture the engine is tested on (one table), the float64
torch.func.jvp oracle on the unpatched model, and batch helpers. Shared by the tests and the benches."""
from __future__ import annotations

import copy

import torch
from torch.func import functional_call

import fwdkernels as fk
import fwdllm

import transformers as tr

# name -> (config class, config kwargs, LoRA targets (q and v), has a causal-LM head)
_ENC = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, num_labels=3, pad_token_id=0)
_DEC = dict(vocab_size=67, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=45, max_position_embeddings=64, pad_token_id=0, num_labels=3)
ARCHS = {
    "bert": (tr.BertConfig, _ENC, ["query", "value"], False),
    "roberta": (tr.RobertaConfig, {**_ENC, "pad_token_id": 1}, ["query", "value"], False),
    "xlm-roberta": (tr.XLMRobertaConfig, {**_ENC, "pad_token_id": 1}, ["query", "value"], False),
    "distilbert": (tr.DistilBertConfig, dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                             max_position_embeddings=64, num_labels=3, pad_token_id=0),
                   ["q_lin", "v_lin"], False),
    "albert": (tr.AlbertConfig, {**_ENC, "embedding_size": 16}, ["query", "value"], False),
    "electra": (tr.ElectraConfig, {**_ENC, "embedding_size": 16}, ["query", "value"], False),
    "gpt2": (tr.GPT2Config, dict(vocab_size=67, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=3,
                                 pad_token_id=0), ["c_attn"], True),
    "opt": (tr.OPTConfig, dict(vocab_size=67, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=45,
                               max_position_embeddings=64, word_embed_proj_dim=32, num_labels=3, pad_token_id=1),
            ["q_proj", "v_proj"], True),
    "llama": (tr.LlamaConfig, _DEC, ["q_proj", "v_proj"], True),
    "qwen2": (tr.Qwen2Config, _DEC, ["q_proj", "v_proj"], True),
    "qwen3": (tr.Qwen3Config, {**_DEC, "head_dim": 8}, ["q_proj", "v_proj"], True),
    "mistral": (tr.MistralConfig, {**_DEC, "sliding_window": 4}, ["q_proj", "v_proj"], True),
    "phi3": (tr.Phi3Config, dict(_DEC, pad_token_id=0), ["qkv_proj"], True),
    "gemma": (tr.GemmaConfig, {**_DEC, "head_dim": 8}, ["q_proj", "v_proj"], True),
}


def config(name, **over):
    cls, kw, _, _ = ARCHS[name]
    cfg = cls(**{**kw, **over})
    cfg._attn_implementation = "eager"
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout", "resid_pdrop",
              "embd_pdrop", "attn_pdrop", "classifier_dropout_prob"):
        if hasattr(cfg, k) and isinstance(getattr(cfg, k), float):
            setattr(cfg, k, 0.1)  # dropout on in the config: the engine must run it in eval mode
    return cfg


def model(name, head="seq", seed=0, **over):
    """A tiny random model: head "seq" (sequence classification) or "lm" (causal LM), eval mode."""
    torch.manual_seed(seed)
    cfg = config(name, **over)
    cls = tr.AutoModelForSequenceClassification if head == "seq" else tr.AutoModelForCausalLM
    return cls.from_config(cfg, attn_implementation="eager").eval()


def lora(m, targets, r=4, task=None, seed=0, **kw):
    import peft
    torch.manual_seed(seed)  # the random (non-zero) LoRA init
    kw.setdefault("lora_dropout", 0.0)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, task_type=task,
                          **kw)
    return peft.get_peft_model(m, cfg).eval()


def batch(m, B=2, L=9, pad=True, labels="cls", seed=1):
    cfg = m.config if hasattr(m, "config") else m.get_base_model().config
    g = torch.Generator().manual_seed(seed)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids = torch.randint(2, cfg.vocab_size, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    if pad and B > 1:
        am[1, L - 3:] = 0
        ids[1, L - 3:] = pad_id
    b = {"input_ids": ids, "attention_mask": am}
    if labels == "cls":
        b["labels"] = torch.randint(0, cfg.num_labels, (B,), generator=g)
    elif labels == "lm":
        lab = ids.clone()
        lab[am == 0] = -100
        b["labels"] = lab
    return b


def reference_jvps(m, b, seeds, dist="rademacher", out="loss", dtype=torch.float64):
    """torch.func.jvp in float64 (or ``dtype``) of the unpatched model's ``out`` along the materialised
    perturbations: (value, (K, ...) jvps)."""
    layout = fwdllm.TrainableLayout(m)
    m64 = copy.deepcopy(m).to(dtype).eval()
    names = [n for n, _ in layout.params]
    p64 = dict(m64.named_parameters())
    primals = tuple(p64[n].detach() for n in names)

    def f(*vals):
        return getattr(functional_call(m64, dict(zip(names, vals)), args=(), kwargs=b), out)

    res = []
    for s in seeds:
        v = fk.perturb(int(s), layout.numel, 0, dist, backend="reference").to(dtype)
        tangents = tuple(v[layout.offset(p):layout.offset(p) + p.numel()].view_as(p) for _, p in layout.params)
        val, j = torch.func.jvp(f, primals, tangents)
        res.append(j)
    return val, torch.stack(res)


def seeds(K, base=7):
    return torch.tensor([fk.derive_seed(base, k) for k in range(K)])
