r"""Run the federated driver over Flower (https://flower.ai): a ``ServerApp`` and a ``ClientApp`` on
Flower's Message API that carry the protocol's byte messages (:mod:`fwdllm.fl.messages`: seeds and
scalars up, sync records and requests down; never gradient arrays) and give the same final
parameters as the in-process driver (:func:`fwdllm.fl.driver.train`) with the same config.

Install: ``pip install -e .[flower]`` (pins ``flwr[simulation]==1.41.0``; the simulation extra brings
Ray). Importing this module sets ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (Flower never
installs packages at run time: every machine needs fwdllm and its dependencies installed
beforehand) and, unless already set, ``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1``
and ``RAY_USAGE_STATS_ENABLED=0`` (nothing is sent or downloaded).

How it works
------------
The ``ServerApp`` (:data:`server_app`) runs :func:`fwdllm.fl.driver.train` unchanged (metrics,
checkpoints, evaluation, summary and report are the in-process driver's) with an ``exchange`` that
delivers each round's jobs as Flower messages. Every SuperNode has a ``partition-id`` p and a
``num-partitions`` P in its node config; the node with partition p hosts the fwdllm clients c with
``c % P == p`` (one client per node when P equals ``data.clients``). At start the server waits until
nodes announcing every partition 0..P-1 are connected (a ``query`` message to each node), then for
each job ``(client, sync messages, request)`` sends one ``train`` message to the client's node whose
content is ``RecordDict({"fwdllm": ConfigRecord})`` with the client id, the sync messages and the
request as bytes, and the resolved config as TOML text (so the node builds the same data split,
partition, model and perturbation groups). The reply carries the upload bytes and the client's
compute seconds; an error reply, a reply without content or no reply within the timeout becomes an
empty upload ``b""``, which the protocol's server rejects and logs (the round goes on).

The ``ClientApp`` (:data:`client_app`) builds a :class:`fwdllm.fl.driver.Run` from the config text once
per process (cached), keeps each client's protocol state (its trainable vector, optimizer state,
model version, last Update; :meth:`fwdllm.fl.protocol.Client.state_dict`) in ``context.state``, the
node's persistent state, so that rounds handled by different worker processes continue from it, and
answers with :meth:`fwdllm.fl.driver.Run.client_exchange`. Each node needs the dataset at the path
named by ``data.path`` (the same file as the server: the split and partition derive from it), or at
the path given by its node config key ``data-path``.

Run configuration (Flower ``run_config``, i.e. ``[tool.flwr.app.config]`` in the app's
``pyproject.toml``, overridable with ``flwr run --run-config``):

==================== ========================================================================
``fwdllm-config``    the fwdllm config: a path to a TOML file (read on the SuperLink's machine) or
                     TOML text; ``""``: the defaults
``fwdllm-overrides`` ``section.key=value`` overrides as for ``fwdllm train``, space separated
                     (shell quoting), e.g. ``"rounds=50 fl.K=32"``
``fwdllm-run-dir``   the run directory (default ``out_dir/name``)
``fwdllm-wait-s``    how long to wait for the SuperNodes to connect (default 600 s)
``fwdllm-timeout-s`` how long to wait for the replies of one exchange (default 3600 s; 0: forever)
==================== ========================================================================

In-process simulation
---------------------
::

    from fwdllm.fl.config import load_config
    from fwdllm.flower import run_simulation
    summary = run_simulation(load_config("run.toml"), "runs/flower", num_supernodes=4)

runs both apps with Flower's Simulation Engine (Ray) in this process (``num_supernodes`` defaults to
``data.clients``) and returns the summary dict of :func:`fwdllm.fl.driver.train`; it shuts Ray down
and waits for (or ends) the processes it started.

Across machines (Flower's Deployment Engine)
--------------------------------------------
Install fwdllm with the extra on every machine (``pip install -e .[flower]``), put the dataset on
each, and ``export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``. The commands below use
``--insecure`` (no TLS) for brevity; use certificates on a real network.

1. On the server machine, the SuperLink; one HTTP port (default 8000) serves the SuperNodes (Fleet
   API) and ``flwr`` (Control API)::

       flower-superlink --insecure --host 0.0.0.0 --port 8000 --disable-runtime-dependency-installation

2. On each client machine i of P (i = 0..P-1), a SuperNode; node i hosts the clients c with
   ``c % P == i`` (P = ``data.clients`` gives one client per node)::

       flower-supernode --insecure --superlink SERVER:8000 \
           --node-config "partition-id=$i num-partitions=$P"

   Several SuperNodes on one machine need distinct ``--port`` values (their local runtime API,
   default 9094). Add ``data-path='/data/train.csv'`` to ``--node-config`` when the dataset
   lives at another path on that machine.

3. Anywhere with ``flwr``, an app directory with this ``pyproject.toml`` (paths are read on the
   SuperLink's machine: make them absolute, or put the TOML text itself in ``fwdllm-config``)::

       [build-system]
       requires = ["hatchling"]
       build-backend = "hatchling.build"

       [project]
       name = "fwdllm-flower"
       version = "0.1.0"
       dependencies = []          # fwdllm[flower] is installed on every machine

       [tool.hatch.build.targets.wheel]
       packages = ["."]

       [tool.flwr.app]
       publisher = "fwdllm"

       [tool.flwr.app.components]
       serverapp = "fwdllm.flower:server_app"
       clientapp = "fwdllm.flower:client_app"

       [tool.flwr.app.config]
       fwdllm-config = "/path/to/run.toml"
       fwdllm-overrides = ""
       fwdllm-run-dir = "/path/to/runs/flower"
       fwdllm-wait-s = 600
       fwdllm-timeout-s = 3600

   and a SuperLink connection in ``$FLWR_HOME/config.toml`` (default ``~/.flwr/config.toml``)::

       [superlink]
       default = "fwdllm"

       [superlink.fwdllm]
       address = "SERVER:8000"
       insecure = true

   then start the run (``--stream`` follows its log)::

       flwr run . fwdllm --stream
       flwr run . fwdllm --run-config 'fwdllm-overrides="rounds=50 fl.K=32"'

   The run directory (metrics, checkpoints, adapter, summary, report) is written on the SuperLink's
   machine, where the ServerApp runs. Every key of the run configuration has to be declared in
   ``[tool.flwr.app.config]`` for ``--run-config`` to override it. In this mode a SuperNode starts
   a fresh ClientApp process per message, which rebuilds the model from the config (a few
   seconds per message), so a round costs a few seconds more than in simulation.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shlex
import tempfile
import threading
import time

os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

try:
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"fwdllm.flower needs Flower ({_e}); install it with:  pip install -e .[flower]  "
        "(flwr[simulation]==1.41.0)") from _e

import numpy as np
import torch

from .fl.config import ConfigError, load_config, to_toml
from .fl.driver import Run, train

log = logging.getLogger("fwdllm.flower")

__all__ = ["server_app", "client_app", "make_server_app", "run_simulation", "config_from_run_config",
           "FlowerExchange", "RECORD", "TRAIN", "HELLO"]

RECORD = "fwdllm"                 # the ConfigRecord's key in every message's RecordDict
TRAIN = "train.fwdllm"            # message type: one job (sync messages + request) for one client
HELLO = "query.fwdllm_hello"      # message type: which partition does this node hold?
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"


# -- config

def _config_from_text(text: str, overrides: list[str] | None = None) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False, encoding="utf-8") as f:
        f.write(text)
    try:
        return load_config(f.name, overrides)
    finally:
        os.unlink(f.name)


def config_from_run_config(run_config) -> tuple[dict, str | None]:
    """(resolved fwdllm config, run_dir or None) from a Flower run_config (see the module doc)."""
    src = str(run_config.get("fwdllm-config", "") or "")
    overrides = shlex.split(str(run_config.get("fwdllm-overrides", "") or ""))
    if not src.strip():
        cfg = load_config(None, overrides)
    elif os.path.isfile(src):
        cfg = load_config(src, overrides)
    elif "\n" in src or "=" in src:
        cfg = _config_from_text(src, overrides)
    else:
        raise ConfigError(f"fwdllm-config {src!r} is neither a TOML file on the server nor TOML text")
    run_dir = str(run_config.get("fwdllm-run-dir", "") or "") or None
    return cfg, run_dir


# -- client state in a ConfigRecord (no pickle: plain ints and float32 bytes)

def _state_to_record(st: dict) -> ConfigRecord:
    rec = {k: int(st[k]) for k in ("bytes_down", "bytes_up", "downloads", "replays")}
    if st["version"] is not None:
        rec["version"] = int(st["version"])
    if st["theta"] is not None:
        rec["theta"] = st["theta"].detach().cpu().contiguous().float().numpy().tobytes()
    if st["opt"] is not None:
        rec["opt"] = np.ascontiguousarray(st["opt"], dtype=np.float32).tobytes()
    if st["last_update"] is not None:
        rec["last_update"] = bytes(st["last_update"])
    return ConfigRecord(rec)


def _state_from_record(rec) -> dict:
    theta = rec.get("theta")
    opt = rec.get("opt")
    return {"version": int(rec["version"]) if "version" in rec else None,
            "theta": None if theta is None else torch.from_numpy(np.frombuffer(theta, np.float32).copy()),
            "opt": None if opt is None else np.frombuffer(opt, np.float32).copy(),
            "last_update": rec.get("last_update"),
            **{k: int(rec[k]) for k in ("bytes_down", "bytes_up", "downloads", "replays")}}


# -- ClientApp

client_app = ClientApp()

_RUN_LOCK = threading.Lock()
_RUN_CACHE: dict = {}   # (config text, data path) -> Run (its clients stay pristine); one entry per process


def _node_partition(context: Context) -> tuple[int, int]:
    nc = context.node_config
    if PARTITION_ID not in nc or NUM_PARTITIONS not in nc:
        raise ValueError("this SuperNode has no partition-id/num-partitions: start it with "
                         "--node-config \"partition-id=I num-partitions=P\"")
    p, n = int(nc[PARTITION_ID]), int(nc[NUM_PARTITIONS])
    if not 0 <= p < n:
        raise ValueError(f"node config partition-id={p} is not in 0..num-partitions-1 ({n})")
    return p, n


def _get_run(cfg_text: str, data_path: str | None) -> Run:
    key = (cfg_text, data_path)
    with _RUN_LOCK:
        hit = _RUN_CACHE.get(key)
        if hit is None:
            overrides = [f"data.path={json.dumps(data_path)}"] if data_path else None
            cfg = _config_from_text(cfg_text, overrides)
            run = Run(cfg, tempfile.gettempdir())  # the run dir is never written on a client
            _RUN_CACHE.clear()
            _RUN_CACHE[key] = hit = run
        return hit


@client_app.query("fwdllm_hello")
def _hello(msg: Message, context: Context) -> Message:
    p, n = _node_partition(context)
    return Message(RecordDict({RECORD: ConfigRecord({PARTITION_ID: p, NUM_PARTITIONS: n})}), reply_to=msg)


@client_app.train("fwdllm")
def _train(msg: Message, context: Context) -> Message:
    rec = msg.content[RECORD]
    cid = int(rec["client"])
    p, n = _node_partition(context)
    if cid % n != p:
        raise ValueError(f"client {cid} does not belong to this node (partition-id={p}, num-partitions={n})")
    data_path = context.node_config.get("data-path")
    run = _get_run(str(rec["config"]), str(data_path) if data_path else None)
    if not 0 <= cid < len(run.clients):
        raise ValueError(f"client {cid} does not exist (data.clients={len(run.clients)})")
    with _RUN_LOCK:  # one model per process: jobs of this process run one at a time
        client = copy.deepcopy(run.clients[cid])   # pristine (never used directly): the state is the node's
        key = f"{RECORD}-client-{cid}"
        if key in context.state:
            client.load_state_dict(_state_from_record(context.state[key]))
        sync = [rec[f"sync-{i}"] for i in range(int(rec["sync-count"]))]
        error = ""
        try:
            upload, seconds = run.client_exchange(client, sync, rec["request"])
        except Exception as e:  # noqa: BLE001 - reported to the server; the state so far is kept
            log.exception("client %d: exchange failed", cid)
            upload, seconds, error = b"", 0.0, f"{type(e).__name__}: {e}"
        context.state[key] = _state_to_record(client.state_dict())
    out = {"upload": bytes(upload), "seconds": float(seconds)}
    if error:
        out["error"] = error
    return Message(RecordDict({RECORD: ConfigRecord(out)}), reply_to=msg)


# -- ServerApp

class FlowerExchange:
    """The driver's ``exchange`` over a Flower Grid (see the module doc)."""

    def __init__(self, grid: Grid, cfg: dict, wait_s: float = 600.0, timeout_s: float | None = 3600.0,
                 poll_s: float = 0.1):
        self.grid, self.cfg = grid, cfg
        self.cfg_text = to_toml(cfg)
        self.wait_s, self.timeout_s, self.poll_s = float(wait_s), timeout_s or None, poll_s
        self.node_of_client: dict[int, int] = {}
        self.num_partitions: int | None = None

    # -- messages
    def _send(self, msgs: list[Message], timeout: float | None) -> list[Message | None]:
        """Push msgs and pull their replies; the replies in msgs' order (None: no reply in time)."""
        pushed = {i for i in self.grid.push_messages(msgs) if i}
        index = {m.metadata.message_id: k for k, m in enumerate(msgs)}
        out: list[Message | None] = [None] * len(msgs)
        waiting = set(pushed)
        end = None if timeout is None else time.monotonic() + timeout
        while waiting:
            for rep in self.grid.pull_messages(list(waiting)):
                mid = rep.metadata.reply_to_message_id
                if mid in waiting:
                    waiting.discard(mid)
                    out[index[mid]] = rep
            if not waiting or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll_s)
        return out

    # -- nodes
    def connect(self) -> dict[int, int]:
        """Wait for nodes announcing every partition; map the clients to them."""
        end = time.monotonic() + self.wait_s
        seen: dict[int, tuple[int, int]] = {}
        while True:
            new = [n for n in sorted(self.grid.get_node_ids()) if n not in seen]
            if new:
                msgs = [Message(RecordDict({RECORD: ConfigRecord({"op": "hello"})}), dst_node_id=n,
                                message_type=HELLO) for n in new]
                for n, rep in zip(new, self._send(msgs, min(30.0, max(1.0, end - time.monotonic())))):
                    if rep is None:
                        continue
                    if rep.has_error() or not rep.has_content() or RECORD not in rep.content:
                        reason = rep.error.reason if rep.has_error() else "no content"
                        raise RuntimeError(f"SuperNode {n} cannot serve fwdllm: {reason}")
                    r = rep.content[RECORD]
                    seen[n] = (int(r[PARTITION_ID]), int(r[NUM_PARTITIONS]))
            counts = sorted({P for _, P in seen.values()})
            if len(counts) > 1:
                raise RuntimeError(f"SuperNodes disagree on num-partitions: {counts}")
            if counts:
                P = counts[0]
                node_of: dict[int, int] = {}
                for n, (p, _) in sorted(seen.items()):
                    if p in node_of:
                        raise RuntimeError(f"SuperNodes {node_of[p]} and {n} both have partition-id={p}")
                    node_of[p] = n
                if len(node_of) == P:
                    break
            if time.monotonic() >= end:
                have = sorted(p for p, _ in seen.values())
                raise RuntimeError(f"timed out after {self.wait_s:g} s waiting for the SuperNodes: partitions "
                                   f"{have} connected of num-partitions={counts[0] if counts else '?'}")
            time.sleep(1.0)
        clients = self.cfg["data"]["clients"]
        if P > clients:
            log.warning("%d SuperNodes for %d clients: partitions >= %d stay idle", P, clients, clients)
        self.num_partitions = P
        self.node_of_client = {c: node_of[c % P] for c in range(clients)}
        log.info("fwdllm over Flower: %d clients on %d SuperNodes", clients, P)
        return self.node_of_client

    def _job_message(self, c: int, sync: list[bytes], request: bytes) -> Message:
        rec = {"client": int(c), "request": bytes(request), "config": self.cfg_text, "sync-count": len(sync)}
        for i, s in enumerate(sync):
            rec[f"sync-{i}"] = bytes(s)
        return Message(RecordDict({RECORD: ConfigRecord(rec)}), dst_node_id=self.node_of_client[c],
                       message_type=TRAIN)

    def __call__(self, jobs) -> list[tuple[bytes, float]]:
        """``exchange(jobs)`` of :meth:`fwdllm.fl.driver.Run.run_round`: [(client, sync, request)] ->
        [(upload bytes, compute seconds)] in order. A node gets one message at a time (its clients'
        jobs go in successive waves), so that its persistent state is never updated concurrently."""
        if not self.node_of_client:
            self.connect()
        results: list[tuple[bytes, float]] = [(b"", 0.0)] * len(jobs)
        pending = list(range(len(jobs)))
        while pending:
            wave, rest, busy = [], [], set()
            for i in pending:
                node = self.node_of_client[int(jobs[i][0])]
                (rest if node in busy else wave).append(i)
                busy.add(node)
            replies = self._send([self._job_message(*jobs[i]) for i in wave], self.timeout_s)
            for i, rep in zip(wave, replies):
                results[i] = self._result(int(jobs[i][0]), rep)
            pending = rest
        return results

    @staticmethod
    def _result(c: int, rep: Message | None) -> tuple[bytes, float]:
        if rep is None:
            log.warning("client %d: no reply in time", c)
            return b"", 0.0
        if rep.has_error():
            log.warning("client %d: error reply: %s", c, rep.error.reason)
            return b"", 0.0
        if not rep.has_content() or RECORD not in rep.content or "upload" not in rep.content[RECORD]:
            log.warning("client %d: reply without an upload", c)
            return b"", 0.0
        r = rep.content[RECORD]
        if r.get("error"):
            log.warning("client %d: %s", c, r["error"])
        return bytes(r["upload"]), float(r.get("seconds", 0.0))


def make_server_app(cfg: dict | None = None, run_dir: str | None = None, on_round=None,
                    result: dict | None = None) -> ServerApp:
    """A ServerApp running :func:`fwdllm.fl.driver.train` over Flower. With ``cfg`` None it reads the
    config from the run_config (see the module doc); ``result`` (a dict) receives ``summary``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        rc = context.run_config
        if cfg is None:
            c, rd = config_from_run_config(rc)
        else:
            c, rd = cfg, run_dir
        timeout = float(rc.get("fwdllm-timeout-s", 3600))
        exchange = FlowerExchange(grid, c, wait_s=float(rc.get("fwdllm-wait-s", 600)),
                                  timeout_s=timeout if timeout > 0 else None)
        exchange.connect()
        summary = train(c, rd, exchange=exchange, on_round=on_round)
        if result is not None:
            result["summary"] = summary
        context.state[RECORD] = ConfigRecord({"summary": json.dumps(summary)})

    return app


server_app = make_server_app()


# -- in-process simulation

def _children() -> dict:
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return {}
    try:
        return {p.pid: p for p in psutil.Process().children(recursive=True)}
    except psutil.Error:  # pragma: no cover
        return {}


def _end_children(before: set, wait_s: float = 15.0) -> list[int]:
    """Wait for the child processes started since ``before`` to exit (reaping zombies); terminate,
    then kill, the ones still alive after wait_s. Returns the pids that had to be ended."""
    import psutil
    end = time.monotonic() + wait_s
    ended: list[int] = []
    quiet = 0
    while True:
        alive = []
        for pid, p in _children().items():
            if pid in before:
                continue
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass
                    continue
            except psutil.NoSuchProcess:
                continue
            alive.append(p)
        if not alive:
            quiet += 1
            if quiet >= 3:  # nothing new for a few polls in a row
                return ended
            time.sleep(0.1)
            continue
        quiet = 0
        if time.monotonic() >= end:
            for p in alive:
                try:
                    p.terminate()
                except psutil.NoSuchProcess:
                    pass
            _, still = psutil.wait_procs(alive, timeout=5)
            for p in still:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(still, timeout=5)
            for p in alive:
                try:
                    os.waitpid(p.pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            ended += [p.pid for p in alive]
            log.warning("ended %d leftover simulation processes: %s", len(alive), [p.pid for p in alive])
            return ended
        time.sleep(0.2)


def _join_flower_threads(before: set, timeout: float = 10.0) -> None:
    """Wait for the threads Flower started during the call (e.g. its telemetry events, which build
    their payload even when telemetry is off and run ``file`` for ``platform.architecture()``)."""
    end = time.monotonic() + timeout
    for t in threading.enumerate():
        if t in before or t is threading.current_thread():
            continue
        target = getattr(t, "_target", None)
        if (getattr(target, "__module__", "") or "").startswith("flwr."):
            t.join(max(0.0, end - time.monotonic()))


def run_simulation(cfg: dict, run_dir: str, num_supernodes: int | None = None, on_round=None,
                   backend_config: dict | None = None, verbose: bool = False) -> dict:
    """Run the ServerApp and ClientApp with Flower's Simulation Engine (Ray) in this process; returns
    the summary of :func:`fwdllm.fl.driver.train` (same run directory contents).

    Args:
        num_supernodes: virtual SuperNodes (default ``data.clients``: one client each).
        on_round: passed to ``train`` (callback(run, row) after each round, on the server side).
        backend_config: Flower's backend config; default: ``client_resources.num_cpus = threads``.
    Ray is shut down afterwards (if this call started it) and the processes it started are awaited
    (ended after a grace period if they linger).
    """
    from flwr.simulation import run_simulation as flwr_run_simulation
    import ray

    n = int(num_supernodes or cfg["data"]["clients"])
    bc = copy.deepcopy(backend_config) if backend_config else {
        "client_resources": {"num_cpus": cfg["threads"], "num_gpus": 0.0}}
    bc.setdefault("init_args", {}).setdefault("include_dashboard", False)
    result: dict = {}
    before = set(_children())
    threads_before = set(threading.enumerate())
    started_ray = not ray.is_initialized()
    try:
        flwr_run_simulation(server_app=make_server_app(cfg, run_dir, on_round, result), client_app=client_app,
                            num_supernodes=n, backend_config=bc, verbose_logging=verbose)
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
        _join_flower_threads(threads_before)
        if started_ray:
            _end_children(before)
    if "summary" not in result:
        raise RuntimeError("the Flower simulation ended without a result (see the log above)")
    return result["summary"]
