"""imgcls label-issues: out-of-fold probabilities by K-fold + cleanlab; CSV, HTML, audit --labels."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from imgcls.cli import main
from tests.conftest import pattern_images, write_folder

pytest.importorskip("cleanlab")


@pytest.fixture
def noisy_npz(tmp_path):
    x, y = pattern_images(60, size=16)
    flip = np.random.default_rng(0).choice(len(y), 9, replace=False)
    y[flip] = (y[flip] + 1) % 3
    path = tmp_path / "noisy.npz"
    np.savez(path, x_train=x, y_train=y, class_names=np.array(["a", "b", "c"]))
    return path, set(flip.tolist())


def test_label_issues_finds_flipped_labels_in_arrays(noisy_npz, tmp_path, capsys):
    path, flipped = noisy_npz
    out = tmp_path / "out" / "issues.csv"
    assert main(["label-issues", str(path), "--out", str(out), "--folds", "3", "--epochs", "4",
                 "--batch-size", "16", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["index", "given_label", "suggested_label", "score"]  # arrays: no path column
    found = {int(r["index"]) for r in rows}
    assert len(found & flipped) >= 7 and len(found - flipped) <= 2  # precision and recall on easy data
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores)  # most suspicious first
    assert summary["issues"] == len(rows) and summary["images_checked"] == 180
    page = out.with_suffix(".html").read_text()
    assert page.count("data:image/png;base64,") == len(rows) and "http" not in page  # self-contained


def test_fast_path_on_files_with_frozen_pretrained_features(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("mobilenetv3_small_050").state_dict().items()},
              str(weights))
    root = write_folder(tmp_path / "photos", n_per_class=8, size=20)
    out = tmp_path / "issues.csv"
    assert main(["label-issues", str(root), "--model", "mobilenetv3_small_050", "--weights", str(weights),
                 "--freeze", "backbone", "--img-size", "32", "--epochs", "3", "--folds", "2", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["fast_path"] and summary["images_checked"] == 24
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0] if rows else {"index": 0, "path": 0, "given_label": 0, "suggested_label": 0, "score": 0}) \
        == ["index", "path", "given_label", "suggested_label", "score"]
    for r in rows:
        assert r["path"].endswith((".png", ".jpg")) and r["given_label"] in ("cat", "dog", "fox")


def test_folds_above_smallest_class_is_one_line(tmp_path, capsys):
    x, y = pattern_images(3, size=16)
    np.savez(tmp_path / "small.npz", x_train=x, y_train=y)
    assert main(["label-issues", str(tmp_path / "small.npz"), "--folds", "5", "--out", str(tmp_path / "i.csv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--folds 5 is more than the 3 training image(s)" in err[0] and "--folds 3" in err[0]


def test_audit_labels_includes_the_summary(noisy_npz, tmp_path, capsys):
    path, _ = noisy_npz
    out = tmp_path / "issues.csv"
    assert main(["label-issues", str(path), "--out", str(out), "--folds", "3", "--epochs", "4",
                 "--batch-size", "16", "--json"]) == 0
    capsys.readouterr()
    main(["audit", str(path), "--no-pixels", "--labels", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["label_issues"]["issues"] == len(list(csv.DictReader(out.open())))
    assert report["summary"]["label_issues"] == report["label_issues"]["issues"] and not report["clean"]
    main(["audit", str(path), "--no-pixels", "--labels", str(out)])
    assert "label issues" in capsys.readouterr().out
    assert main(["audit", str(path), "--no-pixels", "--labels", str(tmp_path / "nope.csv")]) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.shared_data
def test_mnist_subset_flipped_labels_are_found(shared_data, tmp_path, capsys):
    with np.load(shared_data / "mnist.npz") as f:
        x, y = f["x_train"][:4000], f["y_train"][:4000].astype(np.int64)
    rng = np.random.default_rng(0)
    flip = rng.choice(len(y), 200, replace=False)
    y[flip] = (y[flip] + rng.integers(1, 10, len(flip))) % 10
    np.savez(tmp_path / "noisy.npz", x_train=x, y_train=y)
    out = tmp_path / "issues.csv"
    assert main(["label-issues", str(tmp_path / "noisy.npz"), "--out", str(out), "--epochs", "4", "--json"]) == 0
    found = {int(r["index"]) for r in csv.DictReader(out.open())}
    hit = len(found & set(flip.tolist()))
    assert hit / len(found) > 0.7 and hit / len(flip) > 0.7


def test_audit_labels_without_a_csv_runs_the_finder(noisy_npz, tmp_path, monkeypatch, capsys):
    path, _ = noisy_npz
    monkeypatch.chdir(tmp_path)
    main(["audit", str(path), "--no-pixels", "--labels", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["label_issues"]["images_checked"] == 180 and (tmp_path / "issues.csv").is_file()
    assert (tmp_path / "issues.html").is_file()


def test_multi_label_data_is_refused_before_training(tmp_path, capsys):
    """y_train a 0/1 matrix used to train every fold, then die in cleanlab (unhashable ndarray)."""
    x, y = pattern_images(12, size=16)
    np.savez(tmp_path / "ml.npz", x_train=x, y_train=np.eye(3, dtype=np.int64)[y] | (y[:, None] == 0))
    assert main(["label-issues", str(tmp_path / "ml.npz"), "--folds", "2", "--out", str(tmp_path / "i.csv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "label-issues supports single-label data" in err[0] and "ml.npz" in err[0]
    assert not (tmp_path / "i.csv").exists()
