"""The in-process federated simulation behind ``fwdllm train``.

One process plays the server and every client. The clients share one copy of the frozen model (the
compute engine) and each keeps its own trainable vector and optimizer state, synchronised through the
protocol's messages (:mod:`fwdllm.fl.protocol`), whose encoded bytes are counted. Methods:

- ``fwdllm``: forward gradients: seeds and the jvps of one dual forward per group and batch.
- ``mezo``: the same protocol, the jvps replaced by central differences on the same seeds (FedKSeed-like).
- ``fedavg-bp``: backprop local steps (Adam), dense deltas up, dense parameters down (the paper's baseline).

A run directory holds: ``config.toml`` (resolved), ``metrics.jsonl`` and ``metrics.csv`` (one row per
round), ``checkpoint.pt`` (atomic, every ``checkpoint_every`` rounds), ``adapter/`` (the trained
parameters), ``summary.json`` and ``report/`` (plots). ``resume=True`` continues from the checkpoint to
the same final parameters as an uninterrupted run (bit-identical on CPU): everything random derives
from the run seed and the round number, and the checkpoint holds the server's and the clients' state.
"""
from __future__ import annotations

import csv
import fnmatch
import io
import json
import logging
import math
import os
import sys
import time

import numpy as np
import torch

from .. import dual as fdual
from . import data as fdata
from . import messages as M
from .config import ConfigError, load_config, to_toml
from .model import build_model, flat_params, head_names, load_flat, perturbation_groups, save_trainable
from .optim import FlatOptimizer
from .protocol import Client, Group, Server

log = logging.getLogger("fwdllm.fl")

__all__ = ["Run", "train"]

METRIC_KEYS = ["round", "loss", "accuracy", "test_loss", "variance", "relative_variance", "perturbations",
               "requests", "clients", "rejected", "bytes_up", "bytes_down",
               "client_compute_s", "round_compute_s", "wall_s", "lr"]


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Run:
    """A training run: builds data, model, server and clients from a resolved config."""

    def __init__(self, cfg: dict, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir
        torch.set_num_threads(cfg["threads"])
        d = cfg["data"]
        self.ds = fdata.load_dataset(d["path"] or None, d["text_col"], d["label_col"], seed=cfg["seed"],
                                     test_size=d["test_size"])
        parts = fdata.partition(self.ds.labels_of(self.ds.train), d["clients"], alpha=d["alpha"], iid=d["iid"],
                                seed=cfg["seed"], min_size=1)
        self.client_indices = [self.ds.train[p] for p in parts]
        self.model, self.tok, self.dm = build_model(cfg, self.ds.num_classes)
        self.numel = self.dm.numel
        self.groups, self.layouts = self._groups()
        self.lr_scale = torch.ones(self.numel)
        heads = head_names(self.model)
        for grp in cfg["optimizer"]["groups"]:
            # "head": the classification head of any architecture (fwdllm.arch.head_modules)
            pat = grp["pattern"]
            hit = [(n, p) for n, p in self.dm.layout.params
                   if (n in heads if pat == "head" else fnmatch.fnmatchcase(n, pat))]
            if not hit:
                log.warning("optimizer group pattern %r matches no trainable parameter", grp["pattern"])
            for n, p in hit:
                off = self.dm.layout.offset(p)
                self.lr_scale[off:off + p.numel()] = float(grp["lr_scale"])
        theta0 = flat_params(self.dm)
        cand = cfg["sampling"]["candidates"] if cfg["sampling"]["enabled"] else 1
        self.candidates = cand
        self.server = Server(theta0, self.groups, self._optimizer(), cfg["seed"], cfg["fl"]["dist"],
                             history=cfg["fl"]["history"], candidates=cand, sync=cfg["fl"]["sync"])
        self.clients = [Client(c, idx, self._optimizer()) for c, idx in enumerate(self.client_indices)]
        self.versions: dict = {c.cid: None for c in self.clients}  # what the server believes each client holds
        self.round = 0
        self.compute_s = 0.0
        self.wall_s = 0.0
        self.metrics: list[dict] = []

    # -- setup
    def _groups(self):
        f = self.cfg["fl"]
        specs = perturbation_groups(self.model, self.dm, f["K"], f["K_head"], f["separate_head"])
        return [Group(n, k, lay.mask()) for n, lay, k in specs], [lay for _, lay, _ in specs]

    def _optimizer(self):
        o = self.cfg["optimizer"]
        return FlatOptimizer(o["kind"], self.numel, o["lr"], o["schedule"], self.cfg["rounds"], o["warmup"],
                             o["momentum"], o["betas"], o["eps"], self.lr_scale)

    # -- data
    def client_batch(self, c: int, t: int, step: int = 0) -> dict:
        """Client c's mini-batch in round t (local step ``step``): a seeded draw from its examples."""
        idx = self.client_indices[c]
        rng = np.random.default_rng([self.cfg["seed"], t, c, step])
        sel = rng.choice(idx, size=min(self.cfg["data"]["batch_size"], len(idx)), replace=False)
        texts = [self.ds.texts[i] for i in sel]
        enc = self.tok(texts, padding=True, truncation=True, max_length=self.cfg["model"]["max_length"],
                       return_tensors="pt")
        b = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        b["labels"] = torch.tensor([self.ds.labels[i] for i in sel], dtype=torch.long)
        return b

    @torch.no_grad()
    def evaluate(self, theta: torch.Tensor, n: int | None = None) -> tuple[float, float]:
        """(accuracy, mean loss) of theta on the first n test examples (all when n is None/0)."""
        load_flat(self.dm, theta)
        idx = self.ds.test if not n else self.ds.test[:n]
        correct, loss_sum = 0, 0.0
        for b in fdata.batches(self.ds, self.tok, 64, max_length=self.cfg["model"]["max_length"], indices=idx,
                               shuffle=False):
            out = self.model(**b)
            correct += int((out.logits.argmax(-1) == b["labels"]).sum())
            loss_sum += float(out.loss) * len(b["labels"])
        return correct / len(idx), loss_sum / len(idx)

    # -- client work
    def _client_job(self, client: Client, rs: M.RoundStart) -> bytes:
        cfg = self.cfg
        load_flat(self.dm, client.theta)
        method = cfg["method"]
        if method == "fedavg-bp":
            return self._fedavg_job(client, rs)
        batch = self.client_batch(client.cid, rs.round)
        seeds = client.choose_seeds(rs, self.groups, self.candidates, cfg["fl"]["dist"])
        jvps, loss = [], None
        for s, layout in zip(seeds, self.layouts):
            if method == "fwdllm":
                loss, j = fdual.forward_gradient(self.dm, batch, torch.from_numpy(s), cfg["fl"]["dist"], group=layout)
            else:
                loss, j = fdual.central_difference(self.dm, batch, torch.from_numpy(s), cfg["mezo"]["eps"],
                                                   cfg["fl"]["dist"], group=layout)
            jvps.append(j.numpy())
        return client.upload(rs, seeds, jvps, len(batch["labels"]), float(loss))

    def _fedavg_job(self, client: Client, rs: M.RoundStart) -> bytes:
        cfg = self.cfg
        # the same per-group step scales as the forward-gradient methods (optimizer.groups)
        groups = {}
        for _, p in self.dm.layout.params:
            off = self.dm.layout.offset(p)
            groups.setdefault(float(self.lr_scale[off]), []).append(p)
        opt = torch.optim.Adam([{"params": ps, "lr": cfg["fedavg"]["lr"] * sc} for sc, ps in groups.items()])
        losses = []
        with torch.enable_grad():
            for step in range(cfg["fedavg"]["local_steps"]):
                b = self.client_batch(client.cid, rs.round, step)
                opt.zero_grad(set_to_none=True)
                out = self.model(**b)
                out.loss.backward()
                opt.step()
                losses.append(float(out.loss.detach()))
        delta = flat_params(self.dm) - client.theta
        return client.upload_dense(rs, delta, cfg["data"]["batch_size"] * cfg["fedavg"]["local_steps"],
                                   float(np.mean(losses)))

    # -- the client side of one exchange
    def client_exchange(self, client: Client, sync: list[bytes], request: bytes) -> tuple[bytes, float]:
        """What a client does with a server message: apply the sync messages, run the request.
        Returns (upload bytes, compute seconds). Used in-process and by the Flower ClientApp."""
        client.sync(sync, self.groups, self.cfg["fl"]["dist"])
        rs = M.decode(request)
        if not isinstance(rs, M.RoundStart):
            raise M.MessageError(f"client {client.cid}: expected a RoundStart, got {type(rs).__name__}")
        c0 = time.perf_counter()
        data = self._client_job(client, rs)
        return data, time.perf_counter() - c0

    def _exchange_in_process(self, jobs):
        out = []
        for c, sync, req in jobs:
            out.append(self.client_exchange(self.clients[c], sync, req))
        return out

    # -- one round
    def run_round(self, t: int, exchange=None) -> dict:
        """Round t on the server side. ``exchange(jobs)`` delivers [(client, sync messages, request)]
        and returns [(upload bytes, client compute seconds)] in order (default: in process)."""
        cfg, srv = self.cfg, self.server
        exchange = exchange or self._exchange_in_process
        t0 = time.perf_counter()
        compute = 0.0
        srv.begin_round(t)
        rng = np.random.default_rng([cfg["seed"], t, 7])
        order = rng.permutation(len(self.clients))
        n_sel = cfg["fl"]["clients_per_round"]
        active = [int(c) for c in order[:n_sel]]
        next_client = n_sel
        up = down = 0
        requests = 0
        pace = cfg["pacing"]
        pending = [(c, 0) for c in active]
        versions = dict(self.versions)
        aggs = None
        while True:
            jobs = []
            for c, req in pending:
                sync = [M.encode(m) for m in srv.sync_messages(versions.get(c), self.candidates > 1)]
                versions[c] = srv.version
                rs = M.encode(srv.round_start(c, req))
                down += sum(len(m) for m in sync) + len(rs)
                jobs.append((c, sync, rs))
            for (c, _, _), (data, sec) in zip(jobs, exchange(jobs)):
                compute += sec
                up += len(data)
                if srv.receive(data) is None:
                    # the client's state is unknown (it may have failed before syncing, or lost its
                    # state): the next contact downloads the parameters, which is always safe
                    versions[c] = None
            if cfg["method"] == "fedavg-bp":
                break
            aggs = srv.aggregate()
            rel = max(a.relative_variance for a in aggs) if aggs else math.inf
            if not pace["enabled"] or rel <= pace["threshold"] or requests >= pace["max_requests"]:
                break
            requests += 1
            if pace["grow"] == "clients" and next_client < len(order):
                add = [int(c) for c in order[next_client:next_client + n_sel]]
                next_client += len(add)
                active += add
                pending = [(c, 0) for c in add]
            else:
                pending = [(c, requests) for c in active]
        self.versions = versions
        uploads = srv.uploads()
        if cfg["method"] == "fedavg-bp":
            srv.step_dense()
            var = rel = None
            n_pert = 0
        elif aggs:
            srv.step(aggs)
            var = float(sum(a.variance for a in aggs))
            rel = float(max(a.relative_variance for a in aggs))
            n_pert = int(sum(a.num_perturbations for a in aggs))
        else:
            var = rel = None
            n_pert = 0
            log.warning("round %d: no valid upload; the server keeps its parameters", t)
        loss = float(np.mean([u.loss for u in uploads])) if uploads else float("nan")
        return {"round": t, "loss": loss, "variance": var, "relative_variance": rel, "perturbations": n_pert,
                "requests": requests + 1, "clients": len({u.client for u in uploads}),
                "rejected": len(srv.rejections), "bytes_up": up, "bytes_down": down,
                "round_compute_s": compute, "lr": srv.opt.lr_at(srv.version - 1),
                "_wall": time.perf_counter() - t0}

    # -- checkpoints
    def checkpoint_path(self) -> str:
        return os.path.join(self.run_dir, "checkpoint.pt")

    def save_checkpoint(self) -> None:
        st = {"round": self.round, "server": self.server.state_dict(),
              "clients": [c.state_dict() for c in self.clients], "versions": dict(self.versions),
              "compute_s": self.compute_s,
              "wall_s": self.wall_s, "n_metrics": len(self.metrics), "config": to_toml(self.cfg)}
        buf = io.BytesIO()
        torch.save(st, buf)
        _atomic_write(self.checkpoint_path(), buf.getvalue())

    def load_checkpoint(self) -> None:
        try:
            st = torch.load(self.checkpoint_path(), weights_only=False)
        except Exception as e:  # noqa: BLE001 - a corrupt file gets a clear message
            raise RuntimeError(f"cannot read checkpoint {self.checkpoint_path()}: {e}") from None
        self.round = int(st["round"])
        self.server.load_state_dict(st["server"])
        for c, cs in zip(self.clients, st["clients"]):
            c.load_state_dict(cs)
        self.versions = {int(k): v for k, v in st["versions"].items()}
        self.compute_s, self.wall_s = float(st["compute_s"]), float(st["wall_s"])
        self.metrics = _read_metrics(os.path.join(self.run_dir, "metrics.jsonl"))[:int(st["n_metrics"])]


def _read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a crash: the checkpoint says how many rows count
    return out


def _write_metrics(run_dir: str, rows: list[dict]) -> None:
    _atomic_write(os.path.join(run_dir, "metrics.jsonl"),
                  "".join(json.dumps(r) + "\n" for r in rows).encode())
    s = io.StringIO()
    w = csv.DictWriter(s, fieldnames=METRIC_KEYS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    _atomic_write(os.path.join(run_dir, "metrics.csv"), s.getvalue().encode())


def _progress(total: int, initial: int, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, initial=initial, desc="rounds", unit="round", file=sys.stderr,
                        dynamic_ncols=True)
        except ImportError:
            pass
    return None


def train(cfg: dict | None = None, run_dir: str | None = None, resume: bool = False, on_round=None,
          exchange=None) -> dict:
    """Run (or resume) a training run; returns the summary dict (also written to summary.json).

    Args:
        cfg: a resolved config (``load_config``); with ``resume`` it is read from run_dir/config.toml.
        run_dir: default ``cfg.out_dir/(cfg.name or cfg.method)``.
        on_round: optional callback(run, row) after each round (tests use it to kill a run).
        exchange: how requests reach clients (see :meth:`Run.run_round`; the Flower ServerApp passes
            one that sends them as Flower messages); default in process.
    """
    if resume:
        if run_dir is None:
            if cfg is None:
                raise ConfigError("resume needs the run directory")
            run_dir = os.path.join(cfg["out_dir"], cfg["name"] or cfg["method"])
        cpath = os.path.join(run_dir, "config.toml")
        if not os.path.isfile(cpath):
            raise ConfigError(f"cannot resume: {cpath} not found")
        cfg = load_config(cpath)
    else:
        if cfg is None:
            cfg = load_config()
        run_dir = run_dir or os.path.join(cfg["out_dir"], cfg["name"] or cfg["method"])
    os.makedirs(run_dir, exist_ok=True)
    run = Run(cfg, run_dir)
    if resume and os.path.exists(run.checkpoint_path()):
        run.load_checkpoint()
    else:
        if resume:
            log.warning("no checkpoint in %s: starting from round 0", run_dir)
        _atomic_write(os.path.join(run_dir, "config.toml"), to_toml(cfg).encode())
        run.metrics = []
    _write_metrics(run_dir, run.metrics)
    bar = _progress(cfg["rounds"], run.round, cfg["progress"])
    last_acc = next((r["accuracy"] for r in reversed(run.metrics) if r.get("accuracy") is not None), None)
    try:
        while run.round < cfg["rounds"]:
            t = run.round + 1
            row = run.run_round(t, exchange)
            run.compute_s += row["round_compute_s"]
            run.wall_s += row.pop("_wall")
            row["client_compute_s"] = run.compute_s
            row["accuracy"] = row["test_loss"] = None
            last = t == cfg["rounds"]
            if (cfg["eval_every"] and t % cfg["eval_every"] == 0) or last:
                e0 = time.perf_counter()
                acc, tl = run.evaluate(run.server.theta, None if last else cfg["data"]["eval_size"])
                run.wall_s += time.perf_counter() - e0
                row["accuracy"], row["test_loss"] = acc, tl
                last_acc = acc
            row["wall_s"] = run.wall_s
            run.metrics.append(row)
            run.round = t
            _write_metrics(run_dir, run.metrics)
            if cfg["checkpoint_every"] and (t % cfg["checkpoint_every"] == 0 or last):
                run.save_checkpoint()
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc="-" if last_acc is None else f"{last_acc:.3f}")
                bar.update(1)
            if on_round is not None:
                on_round(run, row)
    finally:
        if bar is not None:
            bar.close()
    load_flat(run.dm, run.server.theta)
    adapter = save_trainable(run.model, run.dm, os.path.join(run_dir, "adapter"))
    final = next((r["accuracy"] for r in reversed(run.metrics) if r.get("accuracy") is not None), None)
    summary = {
        "method": cfg["method"], "model": cfg["model"]["name"], "peft": cfg["peft"]["kind"],
        "rounds": run.round, "final_accuracy": final, "majority_accuracy": run.ds.majority_accuracy(),
        "trainable_parameters": run.numel,
        "groups": [{"name": g.name, "K": g.K, "numel": int(g.mask.sum()) if g.mask is not None else run.numel}
                   for g in run.groups],
        "bytes_up": int(sum(r["bytes_up"] for r in run.metrics)),
        "bytes_down": int(sum(r["bytes_down"] for r in run.metrics)),
        "client_compute_s": run.compute_s, "wall_s": run.wall_s, "adapter": adapter, "run_dir": run_dir,
    }
    _atomic_write(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=1).encode())
    try:
        from .report import write_report
        paths = write_report(run_dir)
        summary["report"] = paths.get("report")
    except Exception as e:  # noqa: BLE001 - the run's results are saved; a plotting problem is reported
        log.warning("report not written: %s", e)
        summary["report"] = None
    _atomic_write(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=1).encode())
    return summary
