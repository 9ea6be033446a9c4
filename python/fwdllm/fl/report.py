"""Plots and markdown summaries of federated training runs, from the files the driver writes.

A run directory holds ``metrics.jsonl`` (one JSON object per round; keys used here: ``round``,
``loss``, ``accuracy`` and ``test_loss`` (null on rounds without evaluation), ``clients``,
``bytes_up`` / ``bytes_down`` (this round, all clients), ``client_compute_s`` (cumulative),
``wall_s`` (cumulative); other keys are ignored) and, optionally, ``summary.json`` (``method``,
``final_accuracy``, ``majority_accuracy``). ``Infinity`` / ``NaN`` tokens are accepted; non-finite or
non-numeric values count as missing.

    python -m fwdllm.fl.report RUN_DIR                       # RUN_DIR/report/{*.png, report.md}
    python -m fwdllm.fl.report RUN_A RUN_B RUN_C --out DIR   # DIR/{compare_*.png, compare.md}

matplotlib is imported only when a figure is drawn (Agg canvas, no pyplot state).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

__all__ = ["ReportError", "load_metrics", "load_summary", "write_report", "compare", "main"]


class ReportError(ValueError):
    """A run directory's files are missing or malformed (one-line message naming file and line)."""


# ----------------------------------------------------------------------------------------- loading

def load_metrics(run_dir: str) -> list[dict]:
    """Rows of ``run_dir/metrics.jsonl`` in file order, one dict per non-blank line.

    Raises ReportError if the file is missing or a line is not a JSON object with a numeric ``round``.
    """
    path = os.path.join(run_dir, METRICS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise ReportError(f"{path}: cannot read metrics ({e.strerror or e})") from None
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}, line {lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
        if _num(row.get("round")) is None:
            raise ReportError(f"{path}, line {lineno}: missing or non-numeric 'round'")
        rows.append(row)
    return rows


def load_summary(run_dir: str) -> dict:
    """``run_dir/summary.json`` as a dict; {} if absent. Raises ReportError if it is malformed."""
    path = os.path.join(run_dir, SUMMARY_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot read summary ({e})") from None
    if not isinstance(summary, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    return summary


def _num(x) -> float | None:
    """x as a finite float, else None (null, NaN, inf, bools, strings)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _series(rows: list[dict], xkey: str, ykey: str) -> tuple[list[float], list[float]]:
    """(xs, ys) over the rows where both keys hold finite numbers."""
    xs, ys = [], []
    for r in rows:
        x, y = _num(r.get(xkey)), _num(r.get(ykey))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


@dataclass
class _Run:
    """One run's rows, summary and derived statistics (None where unknown)."""
    run_dir: str
    rows: list[dict]
    summary: dict
    label: str = ""
    method: str | None = None
    rounds: int = 0
    final_accuracy: float | None = None
    best_accuracy: float | None = None
    majority_accuracy: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    up_per_client_round: float | None = None
    down_per_client_round: float | None = None
    client_compute_s: float | None = None
    wall_s: float | None = None


def _load_run(run_dir: str) -> _Run:
    rows = load_metrics(run_dir)
    if not rows:
        raise ReportError(f"{os.path.join(run_dir, METRICS_FILE)}: no rounds recorded")
    summary = load_summary(run_dir)
    run = _Run(run_dir=run_dir, rows=rows, summary=summary)
    method = summary.get("method")
    run.method = method if isinstance(method, str) and method else None
    run.label = run.method or os.path.basename(os.path.normpath(run_dir))
    run.rounds = len(rows)
    accs = [a for a in (_num(r.get("accuracy")) for r in rows) if a is not None]
    run.final_accuracy = _num(summary.get("final_accuracy"))
    if run.final_accuracy is None and accs:
        run.final_accuracy = accs[-1]
    run.best_accuracy = max(accs + ([run.final_accuracy] if run.final_accuracy is not None else []),
                            default=None)
    run.majority_accuracy = _num(summary.get("majority_accuracy"))
    run.bytes_up = int(sum(_num(r.get("bytes_up")) or 0 for r in rows))
    run.bytes_down = int(sum(_num(r.get("bytes_down")) or 0 for r in rows))
    run.up_per_client_round = _per_client_mean(rows, "bytes_up")
    run.down_per_client_round = _per_client_mean(rows, "bytes_down")
    compute = [c for c in (_num(r.get("client_compute_s")) for r in rows) if c is not None]
    run.client_compute_s = max(compute, default=None)  # cumulative: the largest is the total
    wall = [w for w in (_num(r.get("wall_s")) for r in rows) if w is not None]
    run.wall_s = max(wall, default=None)
    return run


def _per_client_mean(rows: list[dict], key: str) -> float | None:
    """Mean over rounds of row[key] / row['clients'] (rounds with clients > 0 and a numeric key)."""
    vals = []
    for r in rows:
        b, c = _num(r.get(key)), _num(r.get("clients"))
        if b is not None and c is not None and c > 0:
            vals.append(b / c)
    return sum(vals) / len(vals) if vals else None


# ----------------------------------------------------------------------------------------- output

def _require_matplotlib():
    """(Figure, FigureCanvasAgg); RuntimeError naming the install command if matplotlib is absent."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError(f"fwdllm.fl.report needs matplotlib for plots ({e}); "
                           "install it with `pip install matplotlib`") from None
    return Figure, FigureCanvasAgg


def _new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    Figure, FigureCanvasAgg = _require_matplotlib()
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _atomic_write(path: str, write) -> str:
    """Call write(file_object) on a temp file next to path, then os.replace it onto path."""
    d, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{base}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _save_figure(fig, path: str) -> str:
    return _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def _write_text(path: str, text: str) -> str:
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _log_scale_if_positive(ax, values):
    if any(v is not None and v > 0 for v in values):
        ax.set_yscale("log")


def _integer_rounds(ax, xkey: str):
    if xkey == "round":
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _fmt_bytes(b: float | None) -> str:
    if b is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1000 or unit == "TB":
            return f"{b:.0f} B" if unit == "B" else f"{b:.2f} {unit}"
        b /= 1000.0
    raise AssertionError("unreachable")


_XLABELS = {"round": "round", "client_compute_s": "cumulative client compute (s)"}


def _plot_acc_loss(runs: list[_Run], xkey: str, path: str, title: str) -> str:
    """Two panels against xkey: test accuracy (evaluated rounds; majority dashed) and training loss."""
    fig, (ax_acc, ax_loss) = _new_figure(2)
    single = len(runs) == 1
    majorities_drawn = set()
    for run in runs:
        xs, ys = _series(run.rows, xkey, "accuracy")
        line, = ax_acc.plot(xs, ys, marker="o", markersize=3, label=run.label if not single else "test accuracy")
        m = run.majority_accuracy
        if m is not None and round(m, 6) not in majorities_drawn:
            majorities_drawn.add(round(m, 6))
            ax_acc.axhline(m, linestyle="--", linewidth=1, color="gray" if not single else line.get_color(),
                           label=f"majority class ({m:.3f})")
        lx, ly = _series(run.rows, xkey, "loss")
        ax_loss.plot(lx, ly, color=line.get_color(), label=run.label if not single else "training loss")
    ax_acc.set(xlabel=_XLABELS.get(xkey, xkey), ylabel="test accuracy", title="test accuracy")
    ax_loss.set(xlabel=_XLABELS.get(xkey, xkey), ylabel="mean client training loss", title="training loss")
    for ax in (ax_acc, ax_loss):
        _integer_rounds(ax, xkey)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save_figure(fig, path)


def _plot_bytes_per_round(run: _Run, path: str) -> str:
    fig, (ax,) = _new_figure(1, width=7.0)
    ups, downs = [], []
    for key, label, marker, acc in (("bytes_up", "bytes up", "^", ups), ("bytes_down", "bytes down", "v", downs)):
        xs, ys = _series(run.rows, "round", key)
        acc.extend(ys)
        ax.plot(xs, ys, marker=marker, markersize=3, label=label)
    _log_scale_if_positive(ax, ups + downs)
    _integer_rounds(ax, "round")
    ax.set(xlabel="round", ylabel="bytes this round (all clients)", title=f"{run.label}: traffic per round")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save_figure(fig, path)


def _plot_compare_bytes(runs: list[_Run], path: str) -> str:
    fig, (ax,) = _new_figure(1, width=max(6.0, 1.6 * len(runs) + 2))
    xs = range(len(runs))
    w = 0.38
    ups = [r.up_per_client_round or 0.0 for r in runs]
    downs = [r.down_per_client_round or 0.0 for r in runs]
    bars_up = ax.bar([x - w / 2 for x in xs], ups, w, label="up")
    bars_down = ax.bar([x + w / 2 for x in xs], downs, w, label="down")
    for bars, vals in ((bars_up, ups), (bars_down, downs)):
        ax.bar_label(bars, labels=[_fmt_bytes(v) if v > 0 else "" for v in vals], fontsize="x-small")
    _log_scale_if_positive(ax, ups + downs)
    ax.set_xticks(list(xs), [r.label for r in runs])
    ax.set(ylabel="mean bytes per client per round", title="communication per client per round")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save_figure(fig, path)


def write_report(run_dir: str, out_dir: str | None = None) -> dict[str, str]:
    """Plots and a markdown summary of one run, written atomically into out_dir (default run_dir/report).

    Returns {name: path} for "accuracy_loss_vs_rounds", "accuracy_loss_vs_compute", "bytes_per_round"
    (PNGs) and "report" (report.md). Raises ReportError for missing, malformed or empty metrics.
    """
    run = _load_run(run_dir)
    out_dir = out_dir if out_dir is not None else os.path.join(run_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    out = {
        "accuracy_loss_vs_rounds": _plot_acc_loss(
            [run], "round", os.path.join(out_dir, "accuracy_loss_vs_rounds.png"), f"{run.label}: vs rounds"),
        "accuracy_loss_vs_compute": _plot_acc_loss(
            [run], "client_compute_s", os.path.join(out_dir, "accuracy_loss_vs_compute.png"),
            f"{run.label}: vs client compute"),
        "bytes_per_round": _plot_bytes_per_round(run, os.path.join(out_dir, "bytes_per_round.png")),
    }
    lines = [
        f"# Run report: {run.label}",
        "",
        f"- run directory: `{os.path.abspath(run_dir)}`",
        f"- method: {run.method or 'n/a'}",
        f"- rounds: {run.rounds}",
        f"- final accuracy: {_fmt(run.final_accuracy)}",
        f"- best accuracy: {_fmt(run.best_accuracy)}",
        f"- majority-class accuracy: {_fmt(run.majority_accuracy)}",
        f"- total bytes up: {_fmt_bytes(run.bytes_up)} ({run.bytes_up} B)",
        f"- total bytes down: {_fmt_bytes(run.bytes_down)} ({run.bytes_down} B)",
        f"- bytes up per client per round: {_fmt_bytes(run.up_per_client_round)}",
        f"- bytes down per client per round: {_fmt_bytes(run.down_per_client_round)}",
        f"- total client compute: {_fmt(run.client_compute_s, '.2f')} s",
        f"- wall clock: {_fmt(run.wall_s, '.2f')} s",
        "",
        "![accuracy and loss vs rounds](accuracy_loss_vs_rounds.png)",
        "",
        "![accuracy and loss vs client compute](accuracy_loss_vs_compute.png)",
        "",
        "![bytes per round](bytes_per_round.png)",
        "",
    ]
    out["report"] = _write_text(os.path.join(out_dir, "report.md"), "\n".join(lines))
    return out


def compare(run_dirs: list[str], out_dir: str, labels: list[str] | None = None) -> dict[str, str]:
    """Side-by-side plots and a markdown table of several runs, written atomically into out_dir.

    labels: one per run (default: summary method, else the directory name; duplicates get the directory
    name appended). Returns {name: path} for "compare_accuracy_vs_rounds", "compare_accuracy_vs_compute",
    "compare_bytes" (PNGs) and "compare" (compare.md).
    """
    if not run_dirs:
        raise ReportError("compare: no run directories given")
    if labels is not None and len(labels) != len(run_dirs):
        raise ReportError(f"compare: {len(labels)} labels for {len(run_dirs)} run directories")
    runs = [_load_run(d) for d in run_dirs]
    if labels is not None:
        for run, label in zip(runs, labels):
            run.label = label
    else:
        counts = {}
        for run in runs:
            counts[run.label] = counts.get(run.label, 0) + 1
        for run in runs:
            if counts[run.label] > 1:
                run.label = f"{run.label} ({os.path.basename(os.path.normpath(run.run_dir))})"
    os.makedirs(out_dir, exist_ok=True)
    out = {
        "compare_accuracy_vs_rounds": _plot_acc_loss(
            runs, "round", os.path.join(out_dir, "compare_accuracy_vs_rounds.png"), "comparison vs rounds"),
        "compare_accuracy_vs_compute": _plot_acc_loss(
            runs, "client_compute_s", os.path.join(out_dir, "compare_accuracy_vs_compute.png"),
            "comparison vs client compute"),
        "compare_bytes": _plot_compare_bytes(runs, os.path.join(out_dir, "compare_bytes.png")),
    }
    lines = [
        "# Run comparison",
        "",
        "| run | method | rounds | final accuracy | best accuracy | client compute (s) "
        "| bytes up / client / round | bytes down / client / round |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(f"| {r.label} | {r.method or 'n/a'} | {r.rounds} | {_fmt(r.final_accuracy)} "
                     f"| {_fmt(r.best_accuracy)} | {_fmt(r.client_compute_s, '.2f')} "
                     f"| {_fmt_bytes(r.up_per_client_round)} | {_fmt_bytes(r.down_per_client_round)} |")
    majorities = sorted({round(r.majority_accuracy, 4) for r in runs if r.majority_accuracy is not None})
    lines += ["", f"Majority-class accuracy: {', '.join(f'{m:.4f}' for m in majorities) or 'n/a'}", "",
              "Runs:", ""]
    lines += [f"- {r.label}: `{os.path.abspath(r.run_dir)}`" for r in runs]
    lines += ["", "![accuracy and loss vs rounds](compare_accuracy_vs_rounds.png)", "",
              "![accuracy and loss vs client compute](compare_accuracy_vs_compute.png)", "",
              "![bytes per client per round](compare_bytes.png)", ""]
    out["compare"] = _write_text(os.path.join(out_dir, "compare.md"), "\n".join(lines))
    return out


# ----------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    """CLI: one RUN_DIR -> write_report (into --out if given); several -> compare (needs --out)."""
    parser = argparse.ArgumentParser(
        prog="python -m fwdllm.fl.report",
        description="Plots and markdown summaries of federated training run directories.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directory holding metrics.jsonl")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output directory (one run: default RUN_DIR/report; several runs: required)")
    parser.add_argument("--labels", nargs="+", default=None, help="labels for the runs when comparing")
    args = parser.parse_args(argv)
    if len(args.run_dirs) > 1 and args.out is None:
        parser.error("comparing several runs requires --out DIR")
    try:
        if len(args.run_dirs) == 1:
            paths = write_report(args.run_dirs[0], out_dir=args.out)
        else:
            paths = compare(args.run_dirs, args.out, labels=args.labels)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
