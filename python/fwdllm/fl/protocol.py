"""The FwdLLM federated protocol: server and client roles as plain classes.

Round t (see :mod:`fwdllm.fl.messages` for the records and their bytes):

1. The server sends ``RoundStart(t, round_seed = derive_seed(run seed, t), model_version, Ks,
   request)``.
2. A client first brings its trainable vector to the server's version (:meth:`Server.sync_messages`):
   by replaying the ``Update`` records it missed (a few bytes per perturbation: the step is rebuilt
   from (seed, group, coefficient) triples and fed to the same deterministic optimizer), or, when it
   is new or older than the server's history, by a ``ParamsDownload`` (parameters + optimizer
   state). Both paths give bit-identical parameters; :class:`Client` counts the bytes of each.
3. For each perturbation group g (:class:`Group`: e.g. the encoder's LoRA and the classifier head,
   each perturbed by its own directions), the client draws seeds ``derive_seed(round_seed, client,
   g, j)`` for j in request*K_g .. (request+1)*K_g - 1 (with discriminative sampling: ``candidates``
   times as many, keeping the K_g whose direction has the highest cosine with the previous round's
   estimate of that group, rebuilt from the last Update), computes their directional derivatives on
   its batch (dual forwards; central differences for ``mezo``) and uploads
   ``ClientUpload(seeds, groups, jvps, num_examples, loss)``.
4. The server validates each upload (:meth:`Server.receive`: decoding, round, version, client,
   the seeds against the ones derived for that client and request, finite values) and, once the
   round's uploads are in, bounds |jvp| robustly against the other uploads (:meth:`Server.pool`).
   A rejected upload is logged and left out; the round goes on.
5. Variance-controlled pacing: each group's pooled estimate has a relative variance
   var(g) / (||g||^2 - var(g)) (:mod:`fwdllm.fl.aggregate`); while the largest is above the
   threshold the driver asks for more perturbations or more clients (bounded), then the server steps.
6. The step (:meth:`Server.step`): g = sum over groups of sum_i c_i v_i|group, the optimizer
   update, the version bump, and the ``Update`` record for everyone.

The ``fedavg-bp`` baseline uses the same roles with dense uploads (``DenseUpload``: the client's
parameter change after local backprop steps) and dense downloads (every client downloads).
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

import fwdkernels as fk

from . import messages as M
from .aggregate import Aggregate, aggregate, combine, discriminative_select
from .optim import FlatOptimizer

log = logging.getLogger("fwdllm.fl")

__all__ = ["Group", "Server", "Client", "Rejection", "apply_update", "round_seed", "client_seeds", "estimate"]


@dataclass
class Group:
    """A perturbation group: ``mask`` (numel,) bool selects its elements of the trainable vector
    (None: all of it); each request draws ``K`` directions for it."""
    name: str
    K: int
    mask: torch.Tensor | None = None


def round_seed(run_seed: int, t: int) -> int:
    return fk.derive_seed(run_seed, t)


def client_seeds(rseed: int, client: int, group: int, first: int, count: int) -> np.ndarray:
    """Seeds of perturbations first .. first+count-1 of ``group`` of ``client`` (round seed ``rseed``)."""
    return np.array([fk.derive_seed(rseed, client, group, j) for j in range(first, first + count)], dtype=np.int64)


def estimate(seeds, groups_of_seeds, coefficients, groups: list[Group], numel: int, dist: str) -> torch.Tensor:
    """g = sum_j coefficients[j] v(seeds[j]) restricted to group groups_of_seeds[j]: (numel,) float32."""
    seeds, gid, coef = np.asarray(seeds, np.int64), np.asarray(groups_of_seeds), np.asarray(coefficients, np.float64)
    g = torch.zeros(numel)
    for k, grp in enumerate(groups):
        sel = gid == k
        if sel.any():
            g.add_(combine(seeds[sel], coef[sel], numel, dist, grp.mask))
    return g


def apply_update(theta: torch.Tensor, opt: FlatOptimizer, upd: M.Update, groups: list[Group], dist: str) -> None:
    """theta <- optimizer step with the Update's gradient (the server and every replaying client run
    exactly this, so they stay bit-identical)."""
    if len(upd.groups) and int(np.max(upd.groups)) >= len(groups):
        raise M.MessageError(f"Update names group {int(np.max(upd.groups))} but there are {len(groups)} groups")
    opt.step(theta, estimate(upd.seeds, upd.groups, upd.coefficients, groups, theta.numel(), dist), upd.model_version)


@dataclass
class Rejection:
    client: int | None
    reason: str


class Server:
    """The server's state: the parameters, the optimizer, the recent Updates, the round's uploads.

    Args:
        theta: (numel,) float32 initial trainable vector.
        groups: the perturbation groups (the clients use the same list).
        opt: the :class:`FlatOptimizer` (the clients build the same one).
        candidates: discriminative sampling's candidates per kept seed (1: off).
        jvp_bound: an upload whose largest |jvp| exceeds jvp_bound x the median |jvp| of the round's
            other uploads (same group) is rejected as absurd.
    """

    def __init__(self, theta: torch.Tensor, groups: list[Group], opt: FlatOptimizer, run_seed: int,
                 dist: str = "rademacher", history: int = 50, candidates: int = 1, jvp_bound: float = 100.0,
                 sync: str = "auto"):
        if sync not in ("auto", "replay", "download"):
            raise ValueError(f"sync must be auto, replay or download, got {sync!r}")
        self.sync = sync
        self.theta = theta.detach().clone().float()
        self.groups = groups
        self.opt = opt
        self.run_seed = run_seed
        self.dist = dist
        self.version = 0
        self.history: deque[M.Update] = deque(maxlen=max(1, history))
        self.candidates = max(1, int(candidates))
        self.jvp_bound = jvp_bound
        self.rejections: list[Rejection] = []
        self._round = None
        self._expect: dict[int, int] = {}
        self._uploads: list = []

    @property
    def Ks(self) -> np.ndarray:
        return np.array([g.K for g in self.groups], np.uint32)

    # -- a round
    def begin_round(self, t: int) -> None:
        self._round, self._expect, self._uploads, self.rejections = t, {}, [], []

    def round_start(self, client: int, request: int = 0) -> M.RoundStart:
        """The request for ``client``: its perturbations number ``request`` of the current round."""
        if self._round is None:
            raise RuntimeError("Server.begin_round first")
        self._expect[client] = request
        return M.RoundStart(self._round, round_seed(self.run_seed, self._round), self.version, self.Ks, request,
                            self.opt.lr_at(self.version))

    def sync_messages(self, client_version: int | None, with_last_update: bool = False) -> list:
        """What a client at ``client_version`` (None: new) needs to reach the server's version: the
        Updates it missed if the history still holds them and (``sync="auto"``) they weigh fewer
        bytes than the parameters, else a ParamsDownload (followed by the last Update, already
        applied, when the client needs the previous estimate for sampling). Replaying costs the
        client one regeneration of every direction of every missed round; downloading costs bytes."""
        if client_version == self.version:
            return []
        hist = {u.model_version: u for u in self.history}
        if self.sync != "download" and client_version is not None and 0 <= client_version < self.version and \
                all(v in hist for v in range(client_version, self.version)):
            replay = [hist[v] for v in range(client_version, self.version)]
            if self.sync == "replay":
                return replay
        else:
            replay = None
        download = M.ParamsDownload(self.version, self.theta.numpy().copy(), self.opt.state())
        if self.sync == "auto" and replay is not None and \
                sum(len(M.encode(u)) for u in replay) <= len(M.encode(download)):
            return replay
        out: list = [download]
        if with_last_update and self.version - 1 in hist:
            out.append(hist[self.version - 1])
        return out

    def _reject(self, client, reason):
        self.rejections.append(Rejection(client, reason))
        log.warning("round %s: rejected upload from client %s: %s", self._round, client, reason)
        return None

    def receive(self, data: bytes):
        """Decode and validate one upload; returns it, or None if rejected (logged and kept in
        ``rejections``)."""
        try:
            msg = M.decode(data)
        except M.MessageError as e:
            return self._reject(None, f"bad encoding: {e}")
        if not isinstance(msg, (M.ClientUpload, M.DenseUpload)):
            return self._reject(None, f"unexpected message type {type(msg).__name__}")
        c = msg.client
        if msg.round != self._round:
            return self._reject(c, f"stale or future round {msg.round} (current {self._round})")
        if msg.model_version != self.version:
            return self._reject(c, f"model version {msg.model_version} (current {self.version})")
        if c not in self._expect:
            return self._reject(c, "client was not asked (or already answered) in this request")
        request = self._expect[c]
        try:
            if isinstance(msg, M.DenseUpload):
                msg.validate(expect_numel=self.theta.numel())
            else:
                msg.validate(expect_K=int(self.Ks.sum()))
                self._check_seeds(msg, request)
        except M.MessageError as e:
            return self._reject(c, str(e))
        del self._expect[c]
        self._uploads.append(msg)
        return msg

    def _check_seeds(self, msg: M.ClientUpload, request: int) -> None:
        rseed = round_seed(self.run_seed, self._round)
        cand = self.candidates
        for k, grp in enumerate(self.groups):
            sel = msg.groups == k
            got = msg.seeds[sel].tolist()
            if len(got) != grp.K:
                raise M.MessageError(f"ClientUpload: {len(got)} seeds for group {grp.name}, expected {grp.K}")
            allowed = set(client_seeds(rseed, msg.client, k, request * grp.K * cand, grp.K * cand).tolist())
            if len(set(got)) != len(got) or not set(got) <= allowed:
                raise M.MessageError(f"ClientUpload: seeds of group {grp.name} are not the ones derived for "
                                     f"client {msg.client}, round {self._round}, request {request}")
        if int(np.max(msg.groups)) >= len(self.groups):
            raise M.MessageError(f"ClientUpload: group {int(np.max(msg.groups))} does not exist")

    def uploads(self) -> list:
        return list(self._uploads)

    def pool(self) -> list:
        """The round's accepted seed uploads after the robust bound: an upload whose largest |jvp| in
        some group exceeds jvp_bound x (median |jvp| of the other uploads in that group) is rejected."""
        ups = [u for u in self._uploads if isinstance(u, M.ClientUpload)]
        keep = []
        for u in ups:
            bad = None
            for k in range(len(self.groups)):
                others = [np.abs(o.jvps[o.groups == k]) for o in ups if o is not u]
                if not others:
                    continue
                ref = float(np.median(np.concatenate(others)))
                mine = np.abs(u.jvps[u.groups == k])
                if mine.size and float(mine.max()) > self.jvp_bound * ref + 1e-30:
                    bad = (f"jvp {float(mine.max()):.3g} in group {self.groups[k].name} beyond the robust bound "
                           f"{self.jvp_bound:g} x median |jvp| {ref:.3g} of the other uploads")
                    break
            if bad:
                self._uploads.remove(u)
                self._reject(u.client, bad)
            else:
                keep.append(u)
        return keep

    def aggregate(self) -> list[Aggregate] | None:
        """One Aggregate per group from the pooled uploads (None when no upload is left)."""
        ups = self.pool()
        if not ups:
            return None
        out = []
        for k, grp in enumerate(self.groups):
            out.append(aggregate([(u.seeds[u.groups == k], u.jvps[u.groups == k], u.num_examples) for u in ups],
                                 self.theta.numel(), self.dist, grp.mask))
        return out

    def step(self, aggs: list[Aggregate]) -> M.Update:
        """Apply the pooled estimates; returns the Update every client will replay."""
        seeds = np.concatenate([a.seeds for a in aggs]).astype(np.int64)
        gid = np.concatenate([np.full(a.seeds.size, k, np.uint8) for k, a in enumerate(aggs)])
        coef = np.concatenate([a.coefficients for a in aggs]).astype(np.float32)
        upd = M.Update(self._round, self.version, seeds, coef, gid)
        # the aggregates already hold each group's sum_i c_i v_i, computed exactly as estimate()
        # would (same seeds, same float32 coefficients, same order; zero outside the group), so the
        # step reuses them instead of regenerating every direction again: replaying clients still
        # land on bit-identical parameters (tested)
        g = torch.zeros_like(self.theta)
        for a in aggs:
            g.add_(a.gradient)
        self.opt.step(self.theta, g, upd.model_version)
        self.history.append(upd)
        self.version += 1
        return upd

    def step_dense(self) -> None:
        """FedAvg: theta += the example-weighted mean of the accepted DenseUploads (the baseline's
        clients always download, so no Update record is kept)."""
        ups = [u for u in self._uploads if isinstance(u, M.DenseUpload)]
        if ups:
            total = float(sum(u.num_examples for u in ups))
            delta = torch.zeros_like(self.theta)
            for u in ups:
                delta.add_(torch.from_numpy(u.delta), alpha=u.num_examples / total)
            self.theta.add_(delta)
        self.history.clear()
        self.version += 1

    def state_dict(self) -> dict:
        return {"theta": self.theta.clone(), "version": self.version, "opt": self.opt.state(),
                "history": [M.encode(u) for u in self.history]}

    def load_state_dict(self, st: dict) -> None:
        self.theta = st["theta"].clone()
        self.version = int(st["version"])
        self.opt.load_state(st["opt"])
        self.history.clear()
        for b in st["history"]:
            self.history.append(M.decode(b))


@dataclass
class Client:
    """A client's state: its examples, its copy of the trainable vector and of the optimizer, the
    last Update it saw (for discriminative sampling) and the bytes it moved."""
    cid: int
    indices: np.ndarray
    opt: FlatOptimizer
    version: int | None = None
    theta: torch.Tensor | None = None
    last_update: M.Update | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    downloads: int = 0
    replays: int = 0

    def sync(self, msgs: list[bytes], groups: list[Group], dist: str) -> int:
        """Apply encoded sync messages from :meth:`Server.sync_messages`; returns their bytes."""
        n = 0
        for data in msgs:
            n += len(data)
            m = M.decode(data)
            if isinstance(m, M.ParamsDownload):
                self.theta = torch.from_numpy(m.params.astype(np.float32)).clone()
                self.opt.load_state(m.optimizer_state)
                self.version = m.model_version
                self.downloads += 1
            elif isinstance(m, M.Update):
                if self.version is not None and m.model_version == self.version - 1:
                    self.last_update = m  # already applied (sent after a download, for sampling)
                    continue
                if self.version is None or m.model_version != self.version:
                    raise M.MessageError(f"client {self.cid}: Update for version {m.model_version} but the client "
                                         f"is at {self.version}")
                apply_update(self.theta, self.opt, m, groups, dist)
                self.version += 1
                self.last_update = m
                self.replays += 1
            else:
                raise M.MessageError(f"client {self.cid}: unexpected sync message {type(m).__name__}")
        self.bytes_down += n
        return n

    def choose_seeds(self, rs: M.RoundStart, groups: list[Group], candidates: int, dist: str) -> list[np.ndarray]:
        """The seeds to evaluate for request ``rs``, one array per group (discriminative sampling:
        the K_g best-aligned of candidates x K_g)."""
        out = []
        prev = None
        if candidates > 1 and self.last_update is not None and self.last_update.model_version == rs.model_version - 1:
            prev = self.last_update
        for k, grp in enumerate(groups):
            K = int(rs.Ks[k])
            if candidates <= 1:
                out.append(client_seeds(rs.round_seed, self.cid, k, rs.request * K, K))
                continue
            cand = client_seeds(rs.round_seed, self.cid, k, rs.request * K * candidates, K * candidates)
            ref = None
            if prev is not None:
                sel = prev.groups == k
                ref = combine(prev.seeds[sel], prev.coefficients[sel], self.theta.numel(), dist, grp.mask)
            out.append(discriminative_select(cand, K, ref, dist, grp.mask))
        return out

    def upload(self, rs: M.RoundStart, seeds: list[np.ndarray], jvps: list, num_examples: int, loss: float) -> bytes:
        gid = np.concatenate([np.full(len(s), k, np.uint8) for k, s in enumerate(seeds)])
        data = M.encode(M.ClientUpload(rs.round, self.cid, rs.model_version, np.concatenate(seeds).astype(np.int64),
                                       np.concatenate([np.asarray(j, np.float32) for j in jvps]),
                                       int(num_examples), float(loss), gid))
        self.bytes_up += len(data)
        return data

    def upload_dense(self, rs: M.RoundStart, delta: torch.Tensor, num_examples: int, loss: float) -> bytes:
        data = M.encode(M.DenseUpload(rs.round, self.cid, rs.model_version, delta.numpy().astype(np.float32),
                                      int(num_examples), float(loss)))
        self.bytes_up += len(data)
        return data

    def state_dict(self) -> dict:
        return {"version": self.version, "theta": None if self.theta is None else self.theta.clone(),
                "opt": self.opt.state() if self.theta is not None else None,
                "last_update": None if self.last_update is None else M.encode(self.last_update),
                "bytes_down": self.bytes_down, "bytes_up": self.bytes_up, "downloads": self.downloads,
                "replays": self.replays}

    def load_state_dict(self, st: dict) -> None:
        self.version = st["version"]
        self.theta = None if st["theta"] is None else st["theta"].clone()
        if st["opt"] is not None:
            self.opt.load_state(st["opt"])
        self.last_update = None if st["last_update"] is None else M.decode(st["last_update"])
        self.bytes_down, self.bytes_up = st["bytes_down"], st["bytes_up"]
        self.downloads, self.replays = st["downloads"], st["replays"]
