"""Turn a pytest-benchmark JSON into the tables of bench/RESULTS.md (replacing the section that
starts with the same heading), with the machine and the command."""
from __future__ import annotations

import json
import platform
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).parent


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def lora_section(benches, machine):
    rows = defaultdict(dict)
    for b in benches:
        e = b["extra_info"]
        if "impl" not in e or "d_in" not in e:
            continue
        rows[(e["d_in"], e["d_out"], e["K"])][e["impl"]] = (b["stats"]["median"], e.get("peak_extra_bytes"),
                                                            e.get("out_bytes"))
    out = ["## Dual LoRA linear (kernel core, issue 2)", "",
           f"Machine: {machine}. Command: `make bench` (pytest-benchmark, `bench/test_lora_linear_dual.py`), "
           "1 thread, M = 8x128 tokens, r = 8, float32. Times are medians (ms); ratios are taken within "
           "this one run. Peak = extra resident memory of one call (outputs included) in MiB; out = the "
           "call's outputs in MiB.", "",
           "| d_in->d_out | K | floor (1+K)M matmul | fused cpp | fused/floor | jvp+vmap | vmap/fused | "
           "autograd fwd+bwd | peak fused / out | peak jvp+vmap |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    mib = 1 / 2**20
    for (d_in, d_out, K), r in sorted(rows.items()):
        def t(name):
            return r[name][0] * 1e3 if name in r else float("nan")
        fl, fu, vm, ag = t("matmul_floor"), t("fused_cpp"), t("jvp_vmap"), t("autograd_fwd_bwd")
        pf = r.get("fused_cpp", (0, None, None))
        pv = r.get("jvp_vmap", (0, None, None))
        peak_f = f"{pf[1] * mib:.1f} / {pf[2] * mib:.1f}" if pf[1] is not None else "n/a"
        peak_v = f"{pv[1] * mib:.1f}" if pv[1] is not None else "n/a"
        out.append(f"| {d_in}->{d_out} | {K} | {fl:.2f} | {fu:.2f} | {fu / fl:.2f} | {vm:.2f} | {vm / fu:.2f} | "
                   f"{ag:.2f} | {peak_f} | {peak_v} |")
    return "\n".join(out) + "\n"


def main(path):
    data = json.loads(Path(path).read_text())
    machine = f"{cpu_name()}, {platform.machine()}, torch {torch.__version__}"
    res = HERE / "RESULTS.md"
    text = res.read_text() if res.exists() else "# Benchmark results\n\n"
    for section in (lora_section(data["benchmarks"], machine), attention_section(data["benchmarks"], machine),
                    model_section(data["benchmarks"], machine)):
        if section is None or section.count("\n|") <= 2:
            continue
        head = section.splitlines()[0]
        pat = re.compile(re.escape(head) + r".*?(?=\n## |\Z)", re.S)
        if pat.search(text):
            text = pat.sub(lambda m: section.rstrip("\n"), text)
        else:
            text = text.rstrip("\n") + "\n\n" + section
        print(section)
    res.write_text(text.rstrip("\n") + "\n")



def attention_section(benches, machine):
    rows = {}
    for b in benches:
        e = b["extra_info"]
        if e.get("op") != "attention_dual":
            continue
        key = (e["Hkv"], e["K"], e.get("causal", False))
        rows.setdefault(key, {})[e["impl"]] = b["stats"]["median"] * 1e3
        shape = f"B={e['B']} H={e['H']} L=S={e['L']} D={e['D']}"
    if not rows:
        return None
    out = ["## Dual attention (dual models, issue 3)", "",
           f"Machine: {machine}. Command: `make bench` (`bench/test_attention_dual.py`), 1 thread, {shape}, "
           "float32, tangents on q, k and v. Medians in ms.", "",
           "| Hkv | K | mask | fused cpp | reference | jvp+vmap | vmap/fused | SDPA primal |", "|---|---|---|---|---|---|---|---|"]
    for (hkv, K, causal), r in sorted(rows.items()):
        def t(k):
            return f"{r[k]:.1f}" if k in r else "-"
        ratio = r.get("jvp_vmap", float("nan")) / r.get("fused_cpp", float("nan"))
        out.append(f"| {hkv} | {K} | {'causal' if causal else 'full'} | {t('fused_cpp')} | {t('reference')} | "
                   f"{t('jvp_vmap')} | {ratio:.2f} | {t('sdpa_primal')} |")
    return "\n".join(out) + "\n"


def model_section(benches, machine):
    rows, depth = {}, {}
    for b in benches:
        e = b["extra_info"]
        if "model" not in e:
            continue
        peak = e.get("peak_extra_bytes")
        if e.get("depth"):
            depth[(e["impl"], e["layers"])] = peak
            continue
        rows.setdefault((e["model"], e["K"]), {})[e["impl"]] = (b["stats"]["median"], peak)
    if not rows and not depth:
        return None
    plain = {m: r["plain_forward"][0] for (m, K), r in rows.items() if "plain_forward" in r}
    fb = {m: r["fwd_bwd"] for (m, K), r in rows.items() if "fwd_bwd" in r}
    out = ["## Forward-gradient step on real models (dual models, issue 3)", "",
           f"Machine: {machine}. Command: `make bench` (`bench/test_models.py`), 1 thread. MiniLM "
           "(all-MiniLM-L6-v2) + LoRA r=8 on query/value, batch 8x128; SmolLM2-135M + LoRA r=8 on q/v, "
           "batch 8x64. Times: medians in ms, and in units of one plain forward (`fwd`) of the same run. "
           "Peak: extra resident MiB of one call.", "",
           "| model | K | fused step | = fwd | jvp+vmap | jvp loop | central diff | vmap/fused | CD/fused | "
           "peak fused | peak vmap | peak fwd+bwd |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    mib = 1 / 2**20
    for (m, K), r in sorted(rows.items()):
        t = {k: v[0] * 1e3 for k, v in r.items()}
        p = {k: v[1] for k, v in r.items()}
        pf = plain.get(m)
        fu = t.get("fwdgrad_fused", float("nan"))
        def f(k):
            return f"{t[k]:.0f}" if k in t else "-"
        def pk(v):
            return f"{v * mib:.0f}" if v is not None else "-"
        fbp = fb.get(m, (None, None))[1]
        out.append(f"| {m} | {K} | {f('fwdgrad_fused')} | {fu / (pf * 1e3):.2f} | {f('jvp_vmap')} | {f('jvp_loop')} | "
                   f"{f('central_diff')} | {t.get('jvp_vmap', float('nan')) / fu:.2f} | "
                   f"{t.get('central_diff', float('nan')) / fu:.2f} | {pk(p.get('fwdgrad_fused'))} | "
                   f"{pk(p.get('jvp_vmap'))} | {pk(fbp)} |")
    for m in sorted(plain):
        out.append(f"\nplain forward of {m}: {plain[m] * 1e3:.0f} ms; forward+backward: {fb[m][0] * 1e3:.0f} ms"
                   if m in fb else f"\nplain forward of {m}: {plain[m] * 1e3:.0f} ms")
    if depth:
        out += ["", "Extra peak MiB of one step, K = 8, random MiniLM-shaped BERT (384 hidden, batch 8x128):", "",
                "| impl | 6 layers | 12 layers |", "|---|---|---|"]
        for impl in sorted({i for i, _ in depth}):
            out.append(f"| {impl} | {depth.get((impl, 6), 0) * mib:.0f} | {depth.get((impl, 12), 0) * mib:.0f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(HERE / ".last.json"))
