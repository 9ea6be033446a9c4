"""Every peft kind through the dual engine, on an encoder (BERT) and a decoder (Qwen2: q/k/v biases for
BitFit): the engine's primal loss equals the model's own forward, and the jvps equal float64
torch.func.jvp of the unpatched model (LoHa: its custom autograd Function has no forward-mode rule in
torch.func, so the oracle replaces it by the same formula as a plain function; the engine runs the
Function itself, whose forward it differentiates op by op)."""
from __future__ import annotations

import pytest
import torch

import fwdllm

import model_zoo as Z

peft = pytest.importorskip("peft")


def _bitfit(m):
    for n, p in m.named_parameters():
        p.requires_grad_(n.endswith(".bias"))
    return m


def _kinds(arch):
    tq = Z.ARCHS[arch][2]
    task = "SEQ_CLS"
    return {
        "lora": lambda m: Z.lora(m, tq, task=task),
        "rslora": lambda m: Z.lora(m, tq, task=task, use_rslora=True),
        "lora-dropout-eval": lambda m: Z.lora(m, tq, task=task, lora_dropout=0.3),
        "dora": lambda m: Z.lora(m, tq, task=task, use_dora=True),
        "ia3": lambda m: peft.get_peft_model(m, peft.IA3Config(task_type=task, init_ia3_weights=False)),
        "loha": lambda m: peft.get_peft_model(m, peft.LoHaConfig(task_type=task, target_modules=tq, r=2,
                                                                 init_weights=False)),
        "lokr": lambda m: peft.get_peft_model(m, peft.LoKrConfig(task_type=task, target_modules=tq, r=2,
                                                                 init_weights=False)),
        "prompt-tuning": lambda m: peft.get_peft_model(m, peft.PromptTuningConfig(task_type=task,
                                                                                  num_virtual_tokens=3)),
        "prefix-tuning": lambda m: peft.get_peft_model(m, peft.PrefixTuningConfig(task_type=task,
                                                                                  num_virtual_tokens=3)),
        "p-tuning": lambda m: peft.get_peft_model(m, peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=3,
                                                                              encoder_hidden_size=16)),
        "adapter": lambda m: fwdllm.add_adapters(m, init_scale=0.5),
        "bitfit": _bitfit,
    }


CASES = [(a, k) for a in ("bert", "qwen2") for k in _kinds(a)]


def _loha_reference(m, b, seeds, monkeypatch):
    import peft.tuners.loha.layer as L
    with monkeypatch.context() as mp:
        mp.setattr(L, "make_weight", lambda w1a, w1b, w2a, w2b, scale: ((w1a @ w1b) * (w2a @ w2b)) * scale)
        return Z.reference_jvps(m, b, seeds)[1]


@pytest.mark.parametrize("arch,kind", CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_peft_kind_matches_the_model(arch, kind, monkeypatch):
    m = _kinds(arch)[kind](Z.model(arch)).eval()
    b = Z.batch(m)
    seeds = Z.seeds(3)
    dm = fwdllm.patch(m)
    loss, jv = fwdllm.forward_gradient(dm, b, seeds)
    with torch.no_grad():
        own = m(**b).loss
    torch.testing.assert_close(loss, own, rtol=1e-6, atol=1e-6)
    ref = _loha_reference(m, b, seeds, monkeypatch) if kind == "loha" else Z.reference_jvps(m, b, seeds)[1]
    err = ((jv.double() - ref).norm() / ref.norm()).item()
    assert err < 2e-5, f"{kind}: relative jvp error {err:.2e} ({jv.tolist()} vs {ref.tolist()})"


def test_lora_dropout_in_training_mode_runs_as_eval():
    """A model left in train mode: the dual forward runs in eval semantics (dropout off) and restores
    the mode."""
    m = Z.lora(Z.model("bert"), ["query", "value"], task="SEQ_CLS", lora_dropout=0.5).train()
    b = Z.batch(m)
    loss, jv = fwdllm.forward_gradient(fwdllm.patch(m), b, [4, 5])
    assert m.training and all(mod.training for mod in m.modules())
    m.eval()
    loss2, jv2 = fwdllm.forward_gradient(fwdllm.patch(m), b, [4, 5])
    torch.testing.assert_close(jv, jv2)


def test_several_active_adapters_and_disabled_adapters():
    """Layers the fused LoRA kernel cannot take (two adapters active) run peft's own forward through the
    op rules; a disabled adapter gives zero jvps for its parameters."""
    m = Z.lora(Z.model("bert"), ["query", "value"])  # no task: no ModulesToSaveWrapper (one adapter only)
    m.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"], init_lora_weights=False))
    m.base_model.set_adapter(["default", "second"])
    for n, p in m.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    b = Z.batch(m)
    seeds = Z.seeds(2)
    dm = fwdllm.patch(m)
    loss, jv = fwdllm.forward_gradient(dm, b, seeds)
    with torch.no_grad():
        own = m(**b).loss
    torch.testing.assert_close(loss, own, rtol=1e-6, atol=1e-6)
    _, ref = Z.reference_jvps(m, b, seeds)
    assert ((jv.double() - ref).norm() / ref.norm()).item() < 2e-5
    with m.disable_adapter():  # the adapters' parameters no longer reach the loss
        loss0, jv0 = fwdllm.forward_gradient(dm, b, seeds)
        with torch.no_grad():
            own0 = m(**b).loss
    torch.testing.assert_close(loss0, own0, rtol=1e-6, atol=1e-6)
    assert torch.equal(jv0, torch.zeros_like(jv0))
