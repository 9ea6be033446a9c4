"""The protocol's roles without a model: a quadratic objective whose exact directional derivatives
stand in for the clients' dual forwards. Replay and download reach bit-identical parameters; every
bad upload is rejected with a reason and the round goes on; the optimizers and schedules."""
import math

import numpy as np
import pytest
import torch

import fwdkernels as fk
from fwdllm.fl import messages as M
from fwdllm.fl.optim import FlatOptimizer, learning_rate
from fwdllm.fl.protocol import Client, Group, Server, client_seeds, estimate

NUMEL = 600


def _groups():
    m = torch.zeros(NUMEL, dtype=torch.bool)
    m[:500] = True
    return [Group("encoder", 6, m), Group("head", 4, ~m)]


def _target():
    return torch.linspace(-1, 1, NUMEL)


def _jvps(theta, seeds, mask):
    """dL.v for L = 0.5 ||theta - target||^2 and v = perturb(seed) restricted to mask."""
    g = theta - _target()
    out = []
    for s in seeds.tolist():
        v = fk.perturb(s, NUMEL)
        out.append(float((g * v)[mask].sum()))
    return np.array(out, np.float32)


def _opt(kind="sgd", **kw):
    return FlatOptimizer(kind, NUMEL, kw.pop("lr", 0.05), kw.pop("schedule", "linear"), 20, **kw)


def _round(srv, clients, t, groups, bad=None):
    srv.begin_round(t)
    for cl in clients:
        sync = [M.encode(m) for m in srv.sync_messages(cl.version)]
        cl.sync(sync, groups, "rademacher")
        rs = M.decode(M.encode(srv.round_start(cl.cid)))
        seeds = cl.choose_seeds(rs, groups, 1, "rademacher")
        jv = [_jvps(cl.theta, s, g.mask) for s, g in zip(seeds, groups)]
        data = cl.upload(rs, seeds, jv, 16, 0.5)
        if bad is not None and cl.cid in bad:
            data = bad[cl.cid](data, rs, seeds, jv, cl)
        srv.receive(data)
    aggs = srv.aggregate()
    srv.step(aggs)
    return aggs


@pytest.mark.parametrize("kind", ["sgd", "sgd-momentum", "adam"])
def test_replay_and_download_reach_identical_parameters(kind):
    groups = _groups()
    mk = (lambda: _opt("sgd", momentum=0.9, lr=0.003)) if kind == "sgd-momentum" else \
        (lambda: _opt(kind, lr=0.05 if kind == "sgd" else 0.01))
    srv = Server(torch.zeros(NUMEL), groups, mk(), run_seed=11, history=3)
    every = [Client(c, np.arange(4), mk()) for c in range(3)]
    late = Client(7, np.arange(4), mk())
    loss0 = 0.5 * float((srv.theta - _target()).square().sum())
    for t in range(1, 9):
        _round(srv, every, t, groups)
    # client 7 never took part: a download; then it replays like the others
    late.sync([M.encode(m) for m in srv.sync_messages(late.version)], groups, "rademacher")
    assert late.downloads == 1 and late.replays == 0
    for cl in every:
        cl.sync([M.encode(m) for m in srv.sync_messages(cl.version)], groups, "rademacher")
        assert cl.replays == 8 and cl.downloads == 1  # first contact downloads (version 0 < history)
        assert torch.equal(cl.theta, srv.theta)
    assert torch.equal(late.theta, srv.theta)
    # a client more than `history` rounds behind must download
    stale = srv.sync_messages(2)
    assert isinstance(stale[0], M.ParamsDownload)
    assert all(isinstance(m, M.Update) for m in srv.sync_messages(srv.version - 3))
    # replay costs a few bytes per perturbation, the download the whole vector
    upd_bytes = len(M.encode(srv.history[-1]))
    assert upd_bytes < 13 * 3 * 10 + 64
    assert len(M.encode(stale[0])) > 4 * NUMEL
    assert 0.5 * float((srv.theta - _target()).square().sum()) < loss0


def test_estimate_is_unbiased_per_group():
    groups = _groups()
    theta = torch.zeros(NUMEL)
    g_true = theta - _target()
    acc = torch.zeros(NUMEL)
    n = 0
    for r in range(60):
        seeds, gid, coef = [], [], []
        for k, grp in enumerate(groups):
            s = client_seeds(fk.derive_seed(5, r), 0, k, 0, 20)
            jv = _jvps(theta, s, grp.mask)
            seeds.append(s)
            gid.append(np.full(20, k))
            coef.append(jv / 20)
        acc += estimate(np.concatenate(seeds), np.concatenate(gid), np.concatenate(coef), groups, NUMEL, "rademacher")
        n += 1
    est = acc / n
    cos = float(est @ g_true / (est.norm() * g_true.norm()))
    assert cos > 0.6  # 1200 directions per group over 500 + 100 dims


def _replace_upload(**changes):
    def f(data, rs, seeds, jv, cl):
        up = M.decode(data, validate=False)
        for k, v in changes.items():
            setattr(up, k, v(up) if callable(v) else v)
        return M.encode(up)
    return f


@pytest.mark.parametrize("bad,reason", [
    (lambda d, *a: d[:-3], "bad encoding"),
    (lambda d, *a: d[:10] + bytes([d[10] ^ 1]) + d[11:], "bad encoding: checksum"),
    (_replace_upload(round=lambda u: u.round - 1), "stale or future round"),
    (_replace_upload(model_version=lambda u: u.model_version + 1), "model version"),
    (_replace_upload(jvps=lambda u: np.where(np.arange(len(u.jvps)) == 0, np.nan, u.jvps).astype(np.float32)),
     "NaN or Inf"),
    (_replace_upload(seeds=lambda u: u.seeds + 1), "not the ones derived"),
    (_replace_upload(seeds=lambda u: u.seeds[:-1], jvps=lambda u: u.jvps[:-1], groups=lambda u: u.groups[:-1]),
     "9 seeds, expected K = 10"),
    (_replace_upload(client=99), "not asked"),
    (_replace_upload(jvps=lambda u: (u.jvps * 1e6).astype(np.float32)), "robust bound"),
], ids=["truncated", "corrupted", "stale", "version", "nan", "seeds", "count", "unknown-client", "absurd"])
def test_bad_uploads_are_rejected_and_the_round_goes_on(bad, reason, caplog):
    groups = _groups()
    srv = Server(torch.zeros(NUMEL), groups, _opt(), run_seed=3)
    clients = [Client(c, np.arange(4), _opt()) for c in range(4)]
    with caplog.at_level("WARNING", logger="fwdllm.fl"):
        aggs = _round(srv, clients, 1, groups, bad={2: bad})
    assert len(srv.rejections) == 1 and reason in srv.rejections[0].reason
    assert reason.split(":")[0] in caplog.text
    assert srv.version == 1
    assert aggs[0].num_perturbations == 3 * groups[0].K  # the three good clients


def test_duplicate_upload_is_rejected():
    groups = _groups()
    srv = Server(torch.zeros(NUMEL), groups, _opt(), run_seed=3)
    cl = Client(0, np.arange(4), _opt())
    srv.begin_round(1)
    cl.sync([M.encode(m) for m in srv.sync_messages(None)], groups, "rademacher")
    rs = srv.round_start(0)
    seeds = cl.choose_seeds(rs, groups, 1, "rademacher")
    data = cl.upload(rs, seeds, [_jvps(cl.theta, s, g.mask) for s, g in zip(seeds, groups)], 8, 0.1)
    assert srv.receive(data) is not None
    assert srv.receive(data) is None and "already answered" in srv.rejections[-1].reason


def test_discriminative_sampling_keeps_aligned_directions():
    groups = _groups()
    srv = Server(torch.zeros(NUMEL), groups, _opt(), run_seed=3, candidates=8)
    clients = [Client(c, np.arange(4), _opt()) for c in range(2)]
    _round(srv, clients, 1, groups)
    cl = clients[0]
    cl.sync([M.encode(m) for m in srv.sync_messages(cl.version)], groups, "rademacher")
    srv.begin_round(2)
    rs = srv.round_start(0)
    chosen = cl.choose_seeds(rs, groups, 8, "rademacher")
    plain = [client_seeds(rs.round_seed, 0, k, 0, g.K) for k, g in enumerate(groups)]
    prev = estimate(cl.last_update.seeds, cl.last_update.groups, cl.last_update.coefficients, groups, NUMEL,
                    "rademacher")

    def mean_cos(seeds, mask):
        p = prev[mask]
        return np.mean([abs(float(fk.perturb(int(s), NUMEL)[mask] @ p)) for s in seeds])

    for k, g in enumerate(groups):
        assert len(chosen[k]) == g.K
        assert mean_cos(chosen[k], g.mask) > mean_cos(plain[k], g.mask)
    # the server accepts seeds from the widened candidate range
    jv = [_jvps(cl.theta, s, g.mask) for s, g in zip(chosen, groups)]
    assert srv.receive(cl.upload(rs, chosen, jv, 8, 0.1)) is not None


def test_learning_rate_schedules():
    assert learning_rate(1.0, "constant", 5, 10) == 1.0
    assert learning_rate(1.0, "linear", 0, 10) == 1.0 and learning_rate(1.0, "linear", 5, 10) == 0.5
    assert learning_rate(1.0, "cosine", 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(1.0, "linear", 1, 10, warmup=4) == 0.5
    with pytest.raises(ValueError, match="schedule"):
        learning_rate(1.0, "step", 1, 10)


def test_adam_matches_torch():
    torch.manual_seed(0)
    g_seq = [torch.randn(NUMEL) for _ in range(5)]
    ours = FlatOptimizer("adam", NUMEL, 0.01, "constant", 5, betas=(0.9, 0.99), eps=1e-8)
    theta = torch.zeros(NUMEL)
    p = torch.nn.Parameter(torch.zeros(NUMEL))
    ref = torch.optim.Adam([p], lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    for i, g in enumerate(g_seq):
        ours.step(theta, g, i)
        p.grad = g.clone()
        ref.step()
    assert torch.allclose(theta, p.detach(), atol=1e-6)
    st = ours.state()
    other = FlatOptimizer("adam", NUMEL, 0.01, "constant", 5)
    other.load_state(st)
    assert torch.equal(other.m, ours.m) and torch.equal(other.v, ours.v)
    with pytest.raises(ValueError, match="expected 1200"):
        other.load_state(np.zeros(3, np.float32))
    assert math.isfinite(float(theta.sum()))
