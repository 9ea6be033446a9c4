"""The ``fwdllm`` command line: ``train``, ``profile``, ``report``.

    fwdllm train [--config run.toml] [--method fwdllm|mezo|fedavg-bp] [--rounds N] ... [--set key=value ...]
    fwdllm train --resume RUN_DIR
    fwdllm profile [--config run.toml] [--batches 3] [--k 64]
    fwdllm report RUN_DIR [RUN_DIR ...] [--out DIR]

Errors in the config, the data or the model print one line naming the problem and exit with status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main"]

# command-line flags -> config keys (the values are parsed as TOML, like --set)
FLAGS = {
    "method": "method", "rounds": "rounds", "eval_every": "eval_every", "checkpoint_every": "checkpoint_every",
    "out": "out_dir", "name": "name", "seed": "seed", "threads": "threads",
    "model": "model.name", "max_length": "model.max_length",
    "peft": "peft.kind", "lora_r": "peft.r",
    "data": "data.path", "text_col": "data.text_col", "label_col": "data.label_col",
    "clients": "data.clients", "alpha": "data.alpha", "batch_size": "data.batch_size",
    "clients_per_round": "fl.clients_per_round", "k": "fl.K", "k_head": "fl.K_head",
    "pacing_threshold": "pacing.threshold", "candidates": "sampling.candidates",
    "optimizer": "optimizer.kind", "lr": "optimizer.lr",
}
STRING_KEYS = {"method", "out_dir", "name", "model.name", "peft.kind", "data.path", "data.text_col", "data.label_col",
               "optimizer.kind"}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (defaults: fwdllm.fl.config.DEFAULTS)")
    for flag, key in FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, metavar="V", help=f"sets {key}")
    p.add_argument("--pacing", dest="pacing", action="store_true", default=None, help="variance-controlled pacing on")
    p.add_argument("--no-pacing", dest="pacing", action="store_false", help="pacing off")
    p.add_argument("--sampling", dest="sampling", action="store_true", default=None,
                   help="discriminative perturbation sampling on")
    p.add_argument("--no-sampling", dest="sampling", action="store_false")
    p.add_argument("--iid", dest="iid", action="store_true", default=None, help="IID partition instead of Dirichlet")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, value in TOML syntax (repeatable), e.g. --set optimizer.warmup=10")


def _overrides(a) -> list[str]:
    out = []
    for flag, key in FLAGS.items():
        v = getattr(a, flag, None)
        if v is not None:
            out.append(f'{key}="{v}"' if key in STRING_KEYS else f"{key}={v}")
    for flag, key in (("pacing", "pacing.enabled"), ("sampling", "sampling.enabled"), ("iid", "data.iid")):
        v = getattr(a, flag, None)
        if v is not None:
            out.append(f"{key}={'true' if v else 'false'}")
    return out + list(a.overrides)


def _load(a):
    from .fl.config import load_config
    return load_config(a.config, _overrides(a))


def cmd_train(a) -> int:
    from .fl.driver import train
    if a.resume:
        summary = train(run_dir=a.resume, resume=True)
    else:
        cfg = _load(a)
        if cfg["peft"]["kind"] == "auto":
            cfg = _auto_peft(cfg)
        summary = train(cfg)
    acc, maj = summary["final_accuracy"], summary["majority_accuracy"]
    print(f"final test accuracy: {acc:.4f}   majority class: {maj:.4f}   ({100 * (acc - maj):+.1f} points)")
    print(f"method {summary['method']}, {summary['rounds']} rounds, {summary['client_compute_s']:.0f} client-seconds, "
          f"{summary['bytes_up'] / 1e3:.1f} kB up, {summary['bytes_down'] / 1e3:.1f} kB down")
    print(f"run directory: {summary['run_dir']}")
    if summary.get("report"):
        print(f"report: {summary['report']}")
    return 0


def _auto_peft(cfg):
    from .fl.profile import format_profile, profile
    rows = profile(cfg)
    print(format_profile(rows, cfg["fl"]["K"]))
    best = next(r for r in rows if r["recommended"])
    cfg["peft"]["kind"] = best["kind"]
    print(f"peft.kind = auto -> {best['kind']}")
    return cfg


def cmd_profile(a) -> int:
    from .fl.profile import format_profile, profile
    cfg = _load(a)
    K = int(a.k) if a.k else cfg["fl"]["K"]
    rows = profile(cfg, batches=a.batches, K=K)
    print(format_profile(rows, K))
    return 0


def cmd_report(a) -> int:
    from .fl import report
    argv = list(a.run_dirs) + (["--out", a.out] if a.out else [])
    return report.main(argv)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fwdllm", description="Backprop-free federated fine-tuning (FwdLLM).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="run the in-process federated simulation")
    _config_args(t)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint")
    p = sub.add_parser("profile", help="PEFT profiler: forward-gradient vs backprop alignment per PEFT kind")
    _config_args(p)
    p.add_argument("--batches", type=int, default=3)
    r = sub.add_parser("report", help="plots of one run, or a comparison of several")
    r.add_argument("run_dirs", nargs="+")
    r.add_argument("--out")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from .fl.config import ConfigError
    from .fl.data import DataError
    from .fl.model import ModelError
    try:
        return {"train": cmd_train, "profile": cmd_profile, "report": cmd_report}[a.cmd](a)
    except (ConfigError, DataError, ModelError) as e:
        print(f"fwdllm {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
