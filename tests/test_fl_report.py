"""fwdllm.fl.report on synthetic run directories: loading (Infinity/NaN/null, malformed lines),
single-run reports, multi-run comparison and the CLI."""
import json
import math
import os

import pytest

pytest.importorskip("matplotlib")

from fwdllm.fl import report as R  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(n=5, clients=4, acc0=0.5, up=1000, down=5000, eval_every=2):
    rows = []
    for r in range(1, n + 1):
        evaluated = r % eval_every == 0 or r == n
        rows.append({
            "round": r, "loss": 1.0 / r, "accuracy": acc0 + 0.05 * r if evaluated else None,
            "test_loss": 0.9 / r if evaluated else None, "variance": 0.1 if r > 1 else None,
            "relative_variance": math.inf if r == 1 else 0.5 / r, "perturbations": 8, "clients": clients,
            "rejected": 0, "bytes_up": up * clients, "bytes_down": down * clients,
            "client_compute_s": 2.0 * r, "round_compute_s": 2.0, "wall_s": 3.0 * r, "extra_key": "ignored",
        })
    return rows


def _make_run(path, rows, summary=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")  # python json writes Infinity / NaN tokens
    if summary is not None:
        with open(os.path.join(path, "summary.json"), "w") as f:
            json.dump(summary, f)
    return str(path)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def test_load_metrics_accepts_infinity_nan_and_blank_lines(tmp_path):
    d = _make_run(tmp_path / "run", _rows(3))
    with open(os.path.join(d, "metrics.jsonl"), "a") as f:
        f.write("\n" + json.dumps({"round": 4, "loss": float("nan"), "accuracy": None}) + "\n")
    rows = R.load_metrics(d)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["relative_variance"] == math.inf and rows[0]["accuracy"] is None
    assert math.isnan(rows[3]["loss"])


def test_load_metrics_malformed_line_names_file_and_line(tmp_path):
    d = _make_run(tmp_path / "run", _rows(3))
    with open(os.path.join(d, "metrics.jsonl"), "a") as f:
        f.write('{"round": 4, "loss": \n')
    with pytest.raises(R.ReportError, match=r"metrics\.jsonl, line 4") as ei:
        R.load_metrics(d)
    assert "\n" not in str(ei.value)
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("line", ["[1, 2]", '{"loss": 1.0}'])
def test_load_metrics_rejects_non_objects_and_missing_round(tmp_path, line):
    d = _make_run(tmp_path / "run", _rows(2))
    with open(os.path.join(d, "metrics.jsonl"), "a") as f:
        f.write(line + "\n")
    with pytest.raises(R.ReportError, match="line 3"):
        R.load_metrics(d)


def test_load_metrics_missing_file(tmp_path):
    with pytest.raises(R.ReportError, match="metrics.jsonl"):
        R.load_metrics(str(tmp_path))


def test_write_report_default_dir(tmp_path):
    d = _make_run(tmp_path / "run", _rows(5, clients=4, up=1000, down=5000),
                  {"method": "fwdllm", "final_accuracy": 0.8125, "majority_accuracy": 0.5})
    out = R.write_report(d)
    assert set(out) == {"accuracy_loss_vs_rounds", "accuracy_loss_vs_compute", "bytes_per_round", "report"}
    for name, path in out.items():
        assert os.path.dirname(path) == os.path.abspath(os.path.join(d, "report"))
        assert os.path.isfile(path)
        if name != "report":
            assert path.endswith(".png") and _is_png(path)
    md = _read(out["report"])
    assert "fwdllm" in md and "0.8125" in md and "0.5000" in md
    assert "rounds: 5" in md
    assert "1.00 KB" in md   # bytes up per client per round: 4000 / 4
    assert "5.00 KB" in md   # bytes down per client per round
    assert "20.00 KB" in md  # total bytes up: 5 * 4000
    assert "10.00 s" in md   # total client compute (cumulative, last round)
    for png in ("accuracy_loss_vs_rounds.png", "accuracy_loss_vs_compute.png", "bytes_per_round.png"):
        assert f"({png})" in md
    assert not [f for f in os.listdir(os.path.join(d, "report")) if f.startswith(".")]  # no temp files left


def test_write_report_without_summary_uses_last_evaluated_accuracy(tmp_path):
    rows = _rows(5)
    rows[-1]["accuracy"] = None  # last round not evaluated: final = round 4's
    d = _make_run(tmp_path / "myrun", rows)
    out = R.write_report(d, out_dir=str(tmp_path / "elsewhere"))
    assert os.path.dirname(out["report"]) == str(tmp_path / "elsewhere")
    md = _read(out["report"])
    assert "myrun" in md and f"{0.5 + 0.05 * 4:.4f}" in md
    assert all(_is_png(p) for k, p in out.items() if k != "report")


def test_write_report_with_no_accuracy_and_zero_bytes(tmp_path):
    rows = _rows(3, up=0, down=0)
    for r in rows:
        r["accuracy"] = None
    d = _make_run(tmp_path / "run", rows, {"method": "mezo", "final_accuracy": None, "majority_accuracy": None})
    out = R.write_report(d)
    md = _read(out["report"])
    assert "final accuracy: n/a" in md
    assert _is_png(out["bytes_per_round"])


def test_write_report_empty_metrics(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text("")
    with pytest.raises(R.ReportError, match="no rounds"):
        R.write_report(str(d))


def _three_runs(tmp_path):
    specs = [("fwdllm", 0.80, 1000, 5000), ("mezo", 0.70, 16, 5000), ("fedavg-bp", 0.85, 500000, 500000)]
    dirs = []
    for i, (method, final, up, down) in enumerate(specs):
        rows = _rows(4 + i, clients=2 + i, acc0=0.4 + 0.05 * i, up=up, down=down)
        dirs.append(_make_run(tmp_path / f"run_{method}", rows,
                              {"method": method, "final_accuracy": final, "majority_accuracy": 0.5}))
    return dirs


def test_compare_three_runs(tmp_path):
    dirs = _three_runs(tmp_path)
    out_dir = str(tmp_path / "cmp")
    out = R.compare(dirs, out_dir)
    assert set(out) == {"compare_accuracy_vs_rounds", "compare_accuracy_vs_compute", "compare_bytes", "compare"}
    for name, path in out.items():
        assert os.path.dirname(path) == out_dir
        if name != "compare":
            assert _is_png(path)
    md = _read(out["compare"])
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 4  # header + 3 runs
    for method, final in (("fwdllm", "0.8000"), ("mezo", "0.7000"), ("fedavg-bp", "0.8500")):
        row = next(line for line in table if line.startswith(f"| {method} "))
        assert final in row
    assert "16 B" in md and "500.00 KB" in md


def test_compare_labels_and_duplicates(tmp_path):
    dirs = _three_runs(tmp_path)
    out = R.compare(dirs, str(tmp_path / "cmp"), labels=["A", "B", "C"])
    md = _read(out["compare"])
    assert "| A |" in md and "| C |" in md
    with pytest.raises(R.ReportError, match="labels"):
        R.compare(dirs, str(tmp_path / "cmp"), labels=["A"])
    # two runs of one method: default labels get the directory name appended
    twin = _make_run(tmp_path / "run_fwdllm_2", _rows(3), {"method": "fwdllm"})
    md = _read(R.compare([dirs[0], twin], str(tmp_path / "cmp2"))["compare"])
    assert "fwdllm (run_fwdllm)" in md and "fwdllm (run_fwdllm_2)" in md


def test_cli(tmp_path, capsys):
    dirs = _three_runs(tmp_path)
    assert R.main([dirs[0]]) == 0
    assert os.path.isfile(os.path.join(dirs[0], "report", "report.md"))
    assert R.main(dirs + ["--out", str(tmp_path / "cmp")]) == 0
    assert os.path.isfile(tmp_path / "cmp" / "compare.md")
    with pytest.raises(SystemExit):
        R.main(dirs)  # several runs need --out
    assert R.main([str(tmp_path / "missing")]) == 1
    assert "metrics.jsonl" in capsys.readouterr().err


def test_import_does_not_load_matplotlib():
    import subprocess
    import sys
    code = "import sys, fwdllm.fl.report; print('matplotlib' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
