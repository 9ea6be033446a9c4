"""fwdllm.flower: the Flower ServerApp/ClientApp give the in-process driver's results bit for bit
(Flower's Simulation Engine, Ray workers), leave no process behind, map clients to SuperNodes by
their partition-id, and turn failed replies into empty uploads."""
import csv
import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest

HAVE_FLWR = importlib.util.find_spec("flwr") is not None
needs_flwr = pytest.mark.skipif(not HAVE_FLWR, reason="flwr is not installed (pip install -e .[flower])")

DETERMINISTIC = ["round", "loss", "accuracy", "test_loss", "variance", "relative_variance", "perturbations",
                 "requests", "clients", "rejected", "bytes_up", "bytes_down", "lr"]
TIMING = {"client_compute_s", "wall_s", "adapter", "run_dir", "report"}


def _write_csv(path, n=200, seed=0):
    rng = random.Random(seed)
    pos = ["great", "wonderful", "brilliant", "moving", "delightful", "superb"]
    neg = ["awful", "boring", "dull", "terrible", "clumsy", "tedious"]
    nouns = ["film", "movie", "story", "plot", "cast", "script"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            lab = i % 2
            adj = rng.choice(pos if lab else neg)
            w.writerow([f"a {adj} {rng.choice(nouns)}, really {adj}", "pos" if lab else "neg"])


def _config(tmp_path, extra=()):
    from fwdllm.fl.config import load_config
    data = tmp_path / "data.csv"
    _write_csv(data)
    return load_config(None, [f"data.path={json.dumps(str(data))}", "data.test_size=40", "data.eval_size=20",
                              "data.clients=4", "fl.clients_per_round=4", "fl.K=4", "fl.K_head=8", "rounds=2",
                              "eval_every=1", "threads=1", "progress=false", "pacing.enabled=false",
                              "checkpoint_every=0", *extra])


def _live_children():
    import psutil
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _describe(pids):
    import psutil
    out = []
    for pid in sorted(pids):
        try:
            p = psutil.Process(pid)
            out.append(f"{pid} {p.status()} {' '.join(p.cmdline())[:200]}")
        except psutil.Error as e:
            out.append(f"{pid} ({type(e).__name__})")
    return out


def _read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _compare_runs(cfg, tmp_path, num_supernodes):
    import torch
    from safetensors.torch import load_file

    import ray
    from fwdllm.fl.driver import train
    from fwdllm.flower import run_simulation

    thetas = {"local": [], "flower": []}
    d1, d2 = str(tmp_path / "local"), str(tmp_path / "flower")
    s1 = train(cfg, d1, on_round=lambda run, row: thetas["local"].append(run.server.theta.clone()))
    before = _live_children()
    s2 = run_simulation(cfg, d2, num_supernodes=num_supernodes,
                        on_round=lambda run, row: thetas["flower"].append(run.server.theta.clone()))
    assert not ray.is_initialized()
    leftover = _live_children() - before
    assert not leftover, f"processes left behind by the simulation: {_describe(leftover)}"

    # the server's parameters after every round, bit for bit
    assert len(thetas["local"]) == len(thetas["flower"]) == cfg["rounds"]
    for a, b in zip(thetas["local"], thetas["flower"]):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    # the saved adapter
    a1 = load_file(os.path.join(d1, "adapter", "adapter_model.safetensors"))
    a2 = load_file(os.path.join(d2, "adapter", "adapter_model.safetensors"))
    assert a1.keys() == a2.keys() and a1
    for k in a1:
        assert torch.equal(a1[k], a2[k]), k
    # summary and metrics (all but timings)
    assert {k: v for k, v in s1.items() if k not in TIMING} == {k: v for k, v in s2.items() if k not in TIMING}
    with open(os.path.join(d2, "summary.json")) as f:
        assert json.load(f)["rounds"] == cfg["rounds"]
    r1, r2 = _read_rows(d1), _read_rows(d2)
    assert len(r1) == len(r2) == cfg["rounds"]
    for x, y in zip(r1, r2):
        assert {k: x[k] for k in DETERMINISTIC} == {k: y[k] for k in DETERMINISTIC}
        assert y["rejected"] == 0
    return r1


@needs_flwr
def test_simulation_matches_in_process(tmp_path):
    cfg = _config(tmp_path)
    rows = _compare_runs(cfg, tmp_path, num_supernodes=4)
    assert all(r["clients"] == 4 and r["perturbations"] == 4 * 12 for r in rows)


@needs_flwr
def test_simulation_matches_in_process_with_pacing_two_clients_per_node(tmp_path):
    # pacing: a second request adds the two other clients (new: a parameter download mid-round), a
    # third asks everyone for more perturbations; 4 clients on 2 SuperNodes (jobs go in waves).
    cfg = _config(tmp_path, ["pacing.enabled=true", "pacing.threshold=0.01", "pacing.max_requests=2",
                             'pacing.grow="clients"', "fl.clients_per_round=2"])
    rows = _compare_runs(cfg, tmp_path, num_supernodes=2)
    assert all(r["requests"] == 3 and r["clients"] == 4 for r in rows)


def test_import_without_flwr_says_how_to_install():
    code = ("import sys\nfor m in ['flwr', 'flwr.app', 'flwr.clientapp', 'flwr.serverapp']: sys.modules[m] = None\n"
            "try:\n    import fwdllm.flower\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "IMPORTERROR" in out.stdout and "pip install -e .[flower]" in out.stdout, out.stdout + out.stderr


# -- FlowerExchange against a fake Grid (no Flower runtime needed beyond the records)

class _Meta:
    def __init__(self, message_id=None, reply_to=None):
        self.message_id, self.reply_to_message_id = message_id, reply_to


class _Msg:
    def __init__(self, content, dst_node_id, message_type):
        self.content, self.dst_node_id, self.message_type = content, dst_node_id, message_type
        self.metadata = _Meta()


class _Reply:
    def __init__(self, to, content=None, error=None):
        self.metadata = _Meta(reply_to=to)
        self.content, self.error = content, error

    def has_error(self):
        return self.error is not None

    def has_content(self):
        return self.content is not None


class _Err:
    reason = "ClientApp crashed"


class _Grid:
    """Nodes 30, 10, 20 holding partitions 0, 1, 2 of 3; ``behaviour[client]`` picks the reply."""

    def __init__(self, behaviour):
        self.nodes = {30: 0, 10: 1, 20: 2}
        self.behaviour = behaviour
        self.outbox, self.sent, self.n = [], [], 0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, msgs):
        ids = []
        for m in msgs:
            self.n += 1
            m.metadata.message_id = f"m{self.n}"
            ids.append(m.metadata.message_id)
            self.sent.append(m)
            rec = m.content["fwdllm"]
            if m.message_type.startswith("query"):
                p = self.nodes[m.dst_node_id]
                self.outbox.append(_Reply(m.metadata.message_id, {"fwdllm": {"partition-id": p, "num-partitions": 3}}))
                continue
            c = rec["client"]
            assert self.nodes[m.dst_node_id] == c % 3
            kind = self.behaviour.get(c, "ok")
            mid = m.metadata.message_id
            if kind == "ok":
                self.outbox.append(_Reply(mid, {"fwdllm": {"upload": f"up{c}:{rec['sync-count']}".encode(),
                                                           "seconds": 0.5 + c}}))
            elif kind == "error":
                self.outbox.append(_Reply(mid, error=_Err()))
            elif kind == "empty":
                self.outbox.append(_Reply(mid, {}))
            elif kind == "flagged":
                self.outbox.append(_Reply(mid, {"fwdllm": {"upload": b"", "seconds": 0.25, "error": "boom"}}))
            # "silent": no reply at all
        return ids

    def pull_messages(self, ids):
        ids = set(ids)
        got = [r for r in self.outbox if r.metadata.reply_to_message_id in ids]
        self.outbox = [r for r in self.outbox if r not in got]
        return list(reversed(got))  # out of order on purpose


@needs_flwr
def test_exchange_maps_partitions_waves_and_failures(monkeypatch):
    import fwdllm.flower as F
    monkeypatch.setattr(F, "Message", _Msg)
    cfg = {"data": {"clients": 6}, "threads": 1}
    monkeypatch.setattr(F, "to_toml", lambda c: "seed = 0\n")
    grid = _Grid({1: "error", 2: "empty", 3: "flagged", 5: "silent"})
    ex = F.FlowerExchange(grid, cfg, wait_s=5, timeout_s=0.3, poll_s=0.01)
    assert ex.connect() == {0: 30, 1: 10, 2: 20, 3: 30, 4: 10, 5: 20}
    jobs = [(c, [b"s"] * c, b"req") for c in (4, 0, 1, 2, 3, 5)]
    out = ex(jobs)
    assert out == [(b"up4:4", 4.5), (b"up0:0", 0.5), (b"", 0.0), (b"", 0.0), (b"", 0.25), (b"", 0.0)]
    train_msgs = [m for m in grid.sent if m.message_type == F.TRAIN]
    assert len(train_msgs) == 6
    first_wave = train_msgs[:3]  # one message per node at a time
    assert len({m.dst_node_id for m in first_wave}) == 3
    assert all(m.content["fwdllm"]["config"] == "seed = 0\n" for m in train_msgs)


@needs_flwr
def test_exchange_rejects_inconsistent_nodes(monkeypatch):
    import fwdllm.flower as F
    monkeypatch.setattr(F, "Message", _Msg)
    monkeypatch.setattr(F, "to_toml", lambda c: "seed = 0\n")
    cfg = {"data": {"clients": 6}, "threads": 1}
    grid = _Grid({})
    grid.nodes = {30: 0, 10: 0, 20: 2}  # two nodes claim partition 0
    with pytest.raises(RuntimeError, match="both have partition-id=0"):
        F.FlowerExchange(grid, cfg, wait_s=2, poll_s=0.01).connect()
    grid = _Grid({})
    grid.nodes = {30: 0, 20: 2}  # partition 1 never connects
    with pytest.raises(RuntimeError, match="timed out"):
        F.FlowerExchange(grid, cfg, wait_s=1.5, poll_s=0.01).connect()


@needs_flwr
def test_config_from_run_config(tmp_path):
    from fwdllm.fl.config import ConfigError, load_config, to_toml
    from fwdllm.flower import config_from_run_config
    cfg = _config(tmp_path)
    path = tmp_path / "run.toml"
    path.write_text(to_toml(cfg))
    got, run_dir = config_from_run_config({"fwdllm-config": str(path), "fwdllm-overrides": "rounds=3 fl.K=2",
                                           "fwdllm-run-dir": str(tmp_path / "out")})
    assert got == {**cfg, "rounds": 3, "fl": {**cfg["fl"], "K": 2}} and run_dir == str(tmp_path / "out")
    got, run_dir = config_from_run_config({"fwdllm-config": to_toml(cfg)})  # TOML text
    assert got == cfg and run_dir is None
    assert config_from_run_config({})[0] == load_config()
    with pytest.raises(ConfigError, match="neither"):
        config_from_run_config({"fwdllm-config": str(tmp_path / "missing.toml")})
