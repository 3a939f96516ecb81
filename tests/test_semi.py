"""imgcls train --unlabeled: pseudo-labels from a teacher join the training split."""

from __future__ import annotations

import json

import numpy as np

from imgcls.cli import main
from tests.conftest import pattern_images


def test_unlabeled_pool_adds_confident_pseudo_labels(tmp_path, capsys):
    x, y = pattern_images(12, size=16)
    xt, yt = pattern_images(10, size=16, seed=1)
    np.savez(tmp_path / "lab.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    xu, _ = pattern_images(30, size=16, seed=2)
    np.savez(tmp_path / "pool.npz", x_unlabeled=xu)
    assert main(["train", "--data", str(tmp_path / "lab.npz"), "--unlabeled", str(tmp_path / "pool.npz"),
                 "--epochs", "6", "--batch-size", "8", "--pseudo-threshold", "0.6", "--out", str(tmp_path / "runs"),
                 "--name", "semi"]) == 0
    m = json.loads((tmp_path / "runs" / "semi" / "metrics.json").read_text())
    note = next(n for n in m["training"]["data_notes"] if n.startswith("semi-supervised"))
    n_pseudo = int(note.split()[1])
    labelled = int(note.split()[-3])  # "... joined the 33 labelled ones"
    assert 0 < n_pseudo <= 90 and labelled < len(y) and m["training"]["train_images"] == labelled + n_pseudo


def test_unlabeled_bad_input_is_one_line(tmp_path, capsys):
    x, y = pattern_images(6, size=16)
    np.savez(tmp_path / "lab.npz", x_train=x, y_train=y)
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "lab.npz"), "--unlabeled", str(tmp_path / "empty"),
                 "--epochs", "1", "--out", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no images" in err[0]
    xu, _ = pattern_images(4, size=20)
    np.savez(tmp_path / "big.npz", x_unlabeled=xu)
    assert main(["train", "--data", str(tmp_path / "lab.npz"), "--unlabeled", str(tmp_path / "big.npz"),
                 "--epochs", "1", "--out", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "same shape" in err[0]
