"""The dual engine on the model's own forward: one table of tiny random configs of every architecture
(tests/model_zoo.py), sequence-classification and causal-LM heads, LoRA on q/v; the oracle is float64
torch.func.jvp of the unpatched model (eager attention) with the perturbations materialised. The
engine's primal loss must equal the model's own forward; every architecture must run its attention and
linears through the fused kernels (counted), with no op left to the generic rule."""
from __future__ import annotations

import pytest
import torch

import fwdllm

import model_zoo as Z

CASES = [(a, h) for a, (_, _, _, lm) in Z.ARCHS.items() for h in (("seq", "lm") if lm else ("seq",))]


def _lora_model(arch, head, **kw):
    task = "SEQ_CLS" if head == "seq" else "CAUSAL_LM"
    return Z.lora(Z.model(arch, head, **kw), Z.ARCHS[arch][2], task=task)


@pytest.mark.parametrize("arch,head", CASES, ids=[f"{a}-{h}" for a, h in CASES])
def test_architecture_matches_float64_jvp(arch, head):
    m = _lora_model(arch, head)
    b = Z.batch(m, labels="cls" if head == "seq" else "lm")
    seeds = Z.seeds(3)
    dm = fwdllm.patch(m)
    loss, jv = fwdllm.forward_gradient(dm, b, seeds)
    with torch.no_grad():
        own = m(**b).loss
    torch.testing.assert_close(loss, own, rtol=1e-6, atol=1e-6)  # the primal is the model's own forward
    ref_loss, ref = Z.reference_jvps(m, b, seeds)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * max(1.0, abs(float(ref_loss)))
    err = ((jv.double() - ref).norm() / ref.norm()).item()
    assert err < 2e-5, f"{arch}/{head}: relative jvp error {err:.2e}"
    st = dm.engine_stats
    fused = st.counts["fused"]
    assert fused["attention"] >= 1 and (fused["lora_linear"] >= 1), st.summary()
    assert st.totals()["generic"] == 0, st.summary()


@pytest.mark.parametrize("arch", ["roberta", "qwen2"])
def test_odd_shapes_and_left_padding(arch):
    """B = 3, L = 13 with ragged padding (right for encoders, left for decoders)."""
    head = "seq"
    m = _lora_model(arch, head)
    g = torch.Generator().manual_seed(3)
    cfg = m.get_base_model().config
    ids = torch.randint(2, cfg.vocab_size, (3, 13), generator=g)
    am = torch.ones(3, 13, dtype=torch.long)
    pad = cfg.pad_token_id
    if arch == "roberta":
        am[1, 9:], am[2, 4:] = 0, 0
    else:  # left padding: the last token is real for every row
        am[1, :5], am[2, :2] = 0, 0
    ids[am == 0] = pad
    b = {"input_ids": ids, "attention_mask": am, "labels": torch.tensor([0, 2, 1])}
    seeds = Z.seeds(2, base=11)
    loss, jv = fwdllm.forward_gradient(fwdllm.patch(m), b, seeds)
    # float32 oracle: HF's eager mask overflows to -inf in float64 on the fully masked (left-padding)
    # query rows, so its float64 forward is NaN there
    ref_loss, ref = Z.reference_jvps(m, b, seeds, dtype=torch.float32)
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    assert ((jv.double() - ref.double()).norm() / ref.double().norm()).item() < 1e-4


def test_unknown_architecture_runs_through_generic_rules():
    """A model the engine has no fused rule for in places (GPT-NeoX: its own rotary, parallel residual)
    still gets exact jvps."""
    import transformers as tr
    torch.manual_seed(0)
    cfg = tr.GPTNeoXConfig(vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=40, max_position_embeddings=32, rotary_pct=0.5, num_labels=2,
                           pad_token_id=0)
    m = tr.GPTNeoXForSequenceClassification(cfg).eval()
    m.config._attn_implementation = "eager"
    m = Z.lora(m, ["query_key_value"], task="SEQ_CLS")
    b = Z.batch(m)
    seeds = Z.seeds(2)
    loss, jv = fwdllm.forward_gradient(fwdllm.patch(m), b, seeds)
    ref_loss, ref = Z.reference_jvps(m, b, seeds)
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    assert ((jv.double() - ref).norm() / ref.norm()).item() < 2e-5


def test_last_block_reads_only_the_rows_the_head_needs():
    """Under a [CLS] classification head, the top block's queries and everything after its attention
    are computed for row 0 only (keys / values whole): counted in the fused linear calls' rows."""
    import fwdkernels as fk
    m = _lora_model("bert", "seq")
    b = Z.batch(m, B=2, L=9)
    rows = []
    orig = fk.lora_linear_dual

    def spy(x, *a, **kw):
        rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return orig(x, *a, **kw)
    dm = fwdllm.patch(m)
    import fwdllm.engine.rules as R
    R.fk.lora_linear_dual = spy
    try:
        fwdllm.forward_gradient(dm, b, [1, 2])
    finally:
        R.fk.lora_linear_dual = orig
    assert min(rows) == 2 and rows.count(18) >= 6, rows  # B * 1 rows in the top block's tail
    dm.lazy_tail = False
    loss2, jv2 = fwdllm.forward_gradient(dm, b, [1, 2])
    dm.lazy_tail = True
    loss1, jv1 = fwdllm.forward_gradient(dm, b, [1, 2])
    torch.testing.assert_close(jv1, jv2, rtol=1e-5, atol=1e-7)


def test_causal_lm_loss_never_holds_the_whole_logit_tangent(monkeypatch):
    """The vocabulary projection's tangents are computed in chunks of positions by the loss."""
    import fwdllm.engine.rules as R
    monkeypatch.setattr(R, "CE_CHUNK_ELEMS", 3 * 2 * 67 * 2)  # K=3, B=2, V=67: two positions a chunk
    m = _lora_model("llama", "lm")
    b = Z.batch(m, labels="lm")
    seeds = Z.seeds(3)
    calls = []
    orig = R.D.cross_entropy_dual

    def spy(logits, ld, labels, **kw):
        calls.append(tuple(ld.shape))
        return orig(logits, ld, labels, **kw)
    monkeypatch.setattr(R.D, "cross_entropy_dual", spy)
    loss, jv = fwdllm.forward_gradient(fwdllm.patch(m), b, seeds)
    assert len(calls) >= 4 and all(c[1] <= 4 for c in calls), calls
    ref_loss, ref = Z.reference_jvps(m, b, seeds)
    assert ((jv.double() - ref).norm() / ref.norm()).item() < 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_with_fp32_adapters(dtype):
    """A bf16 / fp16 base with peft's fp32 LoRA adapters: the engine computes in the base dtype."""
    import peft
    torch.manual_seed(0)
    base = Z.model("llama", "seq").to(dtype)
    m = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False, task_type="SEQ_CLS"), autocast_adapter_dtype=True).eval()
    assert any(p.dtype == torch.float32 for n, p in m.named_parameters() if "lora_" in n)
    b = Z.batch(m)
    seeds = Z.seeds(2)
    dm = fwdllm.patch(m)
    loss, jv = fwdllm.forward_gradient(dm, b, seeds)
    with torch.no_grad():
        own = m(**b).loss
    assert torch.isfinite(jv).all()
    torch.testing.assert_close(loss.float(), own.float(), rtol=2e-2, atol=2e-2)
    ref_loss, ref = Z.reference_jvps(m, b, seeds)
    assert ((jv.double() - ref).norm() / ref.norm()).item() < 0.1  # bf16 / fp16 arithmetic


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_triton_backend_runs_a_whole_model(arch, monkeypatch):
    """FWDKERNELS_BACKEND=triton (interpreter on CPU tensors): the linears and attention take the triton
    kernels, the ops without one fall back, and the model lists them."""
    pytest.importorskip("triton")
    m = _lora_model(arch, "seq")
    b = Z.batch(m, L=5)
    seeds = Z.seeds(2)
    monkeypatch.setenv("FWDKERNELS_BACKEND", "triton")
    dm = fwdllm.patch(m)
    loss, jv = fwdllm.forward_gradient(dm, b, seeds)
    monkeypatch.delenv("FWDKERNELS_BACKEND")
    ref_loss, ref = Z.reference_jvps(m, b, seeds)
    assert ((jv.double() - ref).norm() / ref.norm()).item() < 2e-5
    ops = {r["op"] for r in dm.backend_fallbacks}
    norm = "layer_norm_dual" if arch == "bert" else "rms_norm_dual"
    assert norm in ops and "lora_linear_dual" not in ops and "attention_dual" not in ops, dm.backend_fallbacks
    assert all(r["asked"] == "triton" and "no triton implementation" in r["reason"] for r in dm.backend_fallbacks)
