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
    section = lora_section(data["benchmarks"], machine)
    res = HERE / "RESULTS.md"
    text = res.read_text() if res.exists() else "# Benchmark results\n\n"
    head = section.splitlines()[0]
    pat = re.compile(re.escape(head) + r".*?(?=\n## |\Z)", re.S)
    text = pat.sub(lambda m: section.rstrip("\n"), text) if pat.search(text) else text.rstrip("\n") + "\n\n" + section
    res.write_text(text.rstrip("\n") + "\n")
    print(section)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(HERE / ".last.json"))
