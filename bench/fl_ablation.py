"""Which ingredients of the default recipe matter: `fwdllm train` variants that each change one thing,
with the same rounds, clients and data, and a section of bench/RESULTS.md.

    python bench/fl_ablation.py --out runs/ablation [--jobs 2] [--set rounds=150 ...]

A finished variant's run directory is reused unless --fresh.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from fl_compare import cpu_name, run_all, write_section  # noqa: E402

SECTION = "## Federated training: which ingredients matter (issue 4)"

VARIANTS = [
    ("default", [], "the make-run recipe"),
    ("head-only", ["peft.kind=\"head\""], "train the classifier head alone (no encoder LoRA)"),
    ("one-group", ["fl.separate_head=false"],
     "one set of 128 directions per client over head + encoder (no perturbation groups, no head directions of its own)"),
    ("same-lr", ["optimizer.groups=[]"], "one learning rate for head and encoder (no per-group step)"),
    ("small-K", ["fl.K=32", "fl.K_head=64"], "K = 32 encoder / 64 head directions per client"),
    ("alpha-0.5", ["data.alpha=0.5"], "stronger label skew: Dirichlet alpha = 0.5"),
    ("sgd", ["optimizer.kind=\"sgd\"", "optimizer.lr=0.5"], "SGD (linear decay) instead of Adam"),
    ("pacing", ["pacing.enabled=true"], "variance-controlled pacing on (threshold 20, up to 4 more requests)"),
    ("sampling", ["sampling.enabled=true"], "discriminative perturbation sampling on (10 candidates per kept seed)"),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args(argv)
    variants = [v for v in VARIANTS if not a.only or v[0] in a.only.split(",")]
    cmds = []
    for name, over, _ in variants:
        rd = os.path.join(a.out, name)
        if not a.fresh and os.path.exists(os.path.join(rd, "summary.json")):
            continue
        cmd = [sys.executable, "-m", "fwdllm", "train", "--out", a.out, "--name", name, "--set", "progress=false"]
        for o in list(a.overrides) + over:
            cmd += ["--set", o]
        cmds.append(cmd)
    run_all(cmds, a.jobs)
    rows = []
    for name, over, what in VARIANTS:
        rd = os.path.join(a.out, name)
        if not os.path.exists(os.path.join(rd, "metrics.jsonl")):
            continue
        ms = [json.loads(l) for l in open(os.path.join(rd, "metrics.jsonl"))]
        s = json.load(open(os.path.join(rd, "summary.json"))) if os.path.exists(os.path.join(rd, "summary.json")) else None
        at = {r["round"]: r["accuracy"] for r in ms if r["accuracy"] is not None}
        rows.append((name, what, s, at, sum(r["perturbations"] for r in ms) / len(ms),
                     sum(r["round_compute_s"] for r in ms) / len(ms), len(ms)))
    import tomllib
    c = tomllib.loads(open(os.path.join(a.out, rows[0][0], "config.toml")).read())
    marks = [r for r in range(c["eval_every"], c["rounds"], c["eval_every"])][:4]
    maj = next(r[2]["majority_accuracy"] for r in rows if r[2])
    lines = [SECTION, "",
             f"Machine: {cpu_name()}, {c['threads']} thread(s) per run, 2-4 runs sharing the 2 cores. Command: "
             f"`python bench/fl_ablation.py --out {a.out} --jobs 2{''.join(' --set ' + o for o in a.overrides)}`. "
             f"Every variant changes one thing of the default config (`python/fwdllm/fl/config.py`) and runs "
             f"{c['rounds']} rounds with {c['fl']['clients_per_round']} of {c['data']['clients']} non-IID clients "
             f"(Dirichlet alpha = {c['data']['alpha']}). Final: accuracy on the 2,000-sentence test split after the "
             f"last round (majority class {maj:.3f}); round N: on the first {c['data']['eval_size']} test sentences. "
             "A variant without a final figure was stopped early (the row says after how many rounds).", "",
             "| variant | what changes | " + " | ".join(f"round {m}" for m in marks) +
             " | final | vs majority | perturbations / round | client s / round |",
             "|---|---|" + "---|" * len(marks) + "---|---|---|---|"]
    for name, what, s, at, pert, sec, n in rows:
        fin = f"{s['final_accuracy']:.4f}" if s else f"(stopped at round {n})"
        vs = f"{100 * (s['final_accuracy'] - s['majority_accuracy']):+.1f} pts" if s else ""
        lines.append(f"| {name} | {what} | " + " | ".join(f"{at[m]:.3f}" if m in at else "" for m in marks) +
                     f" | {fin} | {vs} | {pert:,.0f} | {sec:.2f} |")
    write_section("\n".join(lines), heading=SECTION)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
