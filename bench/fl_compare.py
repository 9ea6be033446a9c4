"""Side-by-side federated runs on the default task (MiniLM + rotten tomatoes): fwdllm, mezo and
fedavg-bp with the same rounds, clients and data, then the comparison report and a section of
bench/RESULTS.md (bytes per client per round, accuracy against rounds and client compute).

    python bench/fl_compare.py --out runs/compare [--rounds N] [--set key=value ...] [--methods fwdllm,mezo]

Each method runs as its own `fwdllm train` (so the runs can go in parallel on separate cores with
--jobs 2); a finished run directory is reused unless --fresh.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from report import cpu_name  # noqa: E402
SECTION = "## Federated training: fwdllm vs mezo vs fedavg-bp (issue 4)"


def write_section(text: str, path: Path = HERE / "RESULTS.md", heading: str = SECTION) -> None:
    """Replace the section starting with ``heading`` (up to the next '## ') or append it."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = old.splitlines()
    start = next((i for i, l in enumerate(lines) if l.strip() == heading), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + text.rstrip("\n").splitlines() + [""] + lines[end:]).rstrip("\n") + "\n"
    path.write_text(new)


def run_all(cmds, jobs: int) -> None:
    """Run the commands, at most ``jobs`` at a time; exit if one fails."""
    procs = []
    for cmd in cmds:
        print("running:", " ".join(cmd), flush=True)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        while sum(p.poll() is None for p in procs) >= jobs:
            time.sleep(2)
    for p in procs:
        if p.wait() != 0:
            sys.exit(f"a run failed: {p.args}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--methods", default="fwdllm,mezo,fedavg-bp")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a, extra = ap.parse_known_args(argv)
    methods = a.methods.split(",")
    cmds, dirs = [], {}
    for m in methods:
        rd = os.path.join(a.out, m)
        dirs[m] = rd
        if not a.fresh and os.path.exists(os.path.join(rd, "summary.json")):
            continue
        cmds.append([sys.executable, "-m", "fwdllm", "train", "--method", m, "--out", a.out, "--name", m, "--set",
                     "progress=false"] + sum([["--set", o] for o in a.overrides], []) + extra)
    run_all(cmds, a.jobs)
    from fwdllm.fl.report import compare
    paths = compare([dirs[m] for m in methods], os.path.join(a.out, "report"), labels=methods)
    rows = []
    for m in methods:
        s = json.load(open(os.path.join(dirs[m], "summary.json")))
        ms = [json.loads(l) for l in open(os.path.join(dirs[m], "metrics.jsonl"))]
        per_up = sum(r["bytes_up"] / max(r["clients"], 1) for r in ms) / len(ms)
        per_down = sum(r["bytes_down"] / max(r["clients"], 1) for r in ms) / len(ms)
        acc = [(r["round"], r["accuracy"], r["client_compute_s"]) for r in ms if r["accuracy"] is not None]
        rows.append((m, s, per_up, per_down, acc))
    cfg = open(os.path.join(dirs[methods[0]], "config.toml")).read()
    import tomllib
    c = tomllib.loads(cfg)
    lines = [SECTION, "",
             f"Machine: {cpu_name()}, {c['threads']} threads per run. Command: `python bench/fl_compare.py "
             f"--out {a.out}{''.join(' --set ' + o for o in a.overrides)}{' ' + ' '.join(extra) if extra else ''}`. "
             f"Task: {c['model']['name']} + {c['peft']['kind']} (layers {c['peft']['layers']}, r = {c['peft']['r']}), "
             f"the rotten-tomatoes sentences, {c['data']['clients']} clients (Dirichlet alpha = {c['data']['alpha']}), "
             f"{c['fl']['clients_per_round']} per round, batch {c['data']['batch_size']}, {c['rounds']} rounds for every method; "
             f"fwdllm/mezo: K = {c['fl']['K']} encoder + {c['fl']['K_head']} head directions per client, "
             f"optimizer {c['optimizer']['kind']} lr {c['optimizer']['lr']}; fedavg-bp: {c['fedavg']['local_steps']} local "
             f"Adam steps at lr {c['fedavg']['lr']}. Accuracy on the full 2,000-sentence test split at the end "
             f"(majority class {rows[0][1]['majority_accuracy']:.3f}); in between on its first {c['data']['eval_size']}.", "",
             "| method | final accuracy | vs majority | bytes up / client / round | bytes down / client / round | "
             "client compute s | wall s |", "|---|---|---|---|---|---|---|"]
    for m, s, up, down, _ in rows:
        lines.append(f"| {m} | {s['final_accuracy']:.4f} | {100 * (s['final_accuracy'] - s['majority_accuracy']):+.1f} pts | "
                     f"{up:,.0f} | {down:,.0f} | {s['client_compute_s']:.0f} | {s['wall_s']:.0f} |")
    lines += ["", "Accuracy (evaluation subset; last row: full test split) against rounds and cumulative client "
              "compute seconds:", "", "| method | " + " | ".join(f"round {r}" for r, _, _ in rows[0][4]) + " |",
              "|---|" + "---|" * len(rows[0][4])]
    for m, _, _, _, acc in rows:
        lines.append(f"| {m} | " + " | ".join(f"{a_:.3f} ({t:.0f} s)" for _, a_, t in acc) + " |")
    lines += ["", f"Plots: `{paths.get('compare_accuracy_vs_rounds', '')}`, `{paths.get('compare_accuracy_vs_compute', '')}`, "
              f"`{paths.get('compare_bytes', '')}` (not committed; rerun the command)."]
    write_section("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
