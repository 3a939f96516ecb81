"""Regressions of the trust layer: APS/RAPS sets of confident images, where the sets were
fitted on (and whether evaluate measures on that split), ``from_config`` data forms, the
missing-threshold message. Small generated data, seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imgcls.engine.conformal import calibration_scores, fit_conformal, prediction_sets


def _uncertain(n: int, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
    p = np.exp(rng.normal(size=(n, k)) * 1.5)
    p /= p.sum(1, keepdims=True)
    return p, (p.cumsum(1) < rng.random((n, 1))).sum(1).clip(0, k - 1)


@pytest.mark.parametrize("method", ["aps", "raps"])
def test_a_saturated_image_always_gets_its_top_class(method):
    """Every one-hot image of a class used to share one 'random' u (a hash of the rounded
    row): where it exceeded q, all of them got an empty set (digits class 7: 36 empty sets)."""
    p, y = _uncertain(400, 10, np.random.default_rng(0))
    c = fit_conformal(p, y, 0.9, method)
    assert c["qhat"] < 1
    one_hot = np.repeat(np.eye(10), 5, axis=0)  # five saturated images of every class
    sets = prediction_sets(one_hot, c["qhat"], method, c.get("k_reg"), c.get("lambda", 0.0))
    assert sets.tolist() == one_hot.astype(bool).tolist()
    # and no image of the uncertain kind gets an empty set either
    assert prediction_sets(p, c["qhat"], method, c.get("k_reg"), c.get("lambda", 0.0)).any(1).all()


def test_calibration_draws_u_independently_of_the_probabilities():
    """Identical calibration rows get different scores (u is not a function of the row)."""
    same = np.tile([[0.7, 0.2, 0.1]], (50, 1))
    s = calibration_scores(same, np.zeros(50, dtype=np.int64), "aps")
    assert len(np.unique(s)) == 50 and 0 <= s.min() and s.max() <= 0.7
    assert (calibration_scores(same, np.zeros(50, dtype=np.int64), "aps") == s).all()  # seeded


# ---------------------------------------------------------------------- where the sets were fitted
@pytest.fixture(scope="module")
def conformal_run(tmp_path_factory):
    """A tiny run trained with --conformal 0.9 (a calib-split hold-out of train) --ood-method energy."""
    from imgcls import train
    from tests.test_trust import write_trust_data

    root = write_trust_data(tmp_path_factory.mktemp("fitted"))
    r = train({"data": str(root / "d.npz"), "epochs": 1, "batch_size": 16, "out": str(root / "runs"),
               "name": "trust", "seed": 0, "conformal": 0.9, "ood_method": "energy"}, progress=False)
    return r.run_dir, root


def test_train_conformal_records_the_calib_split_once(conformal_run):
    run, _ = conformal_run
    card = json.loads((run / "model.json").read_text())
    assert card["conformal"]["fitted_on"] == "calib_split" and card["conformal"]["num_images"] == 15
    assert card["calibration"]["fitted_on"] == "calib_split" and card["calibration"]["num_images"] == 15
    assert "conformal" not in card["calibration"] and "ood" not in card["calibration"]  # no nested duplicate
    assert card["ood"]["fitted_on"] == "val"


def test_evaluate_notes_figures_measured_on_the_split_they_were_fitted_on(conformal_run, tmp_path, capsys):
    import shutil

    from imgcls.cli import main

    src, root = conformal_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    d, noise = str(root / "d.npz"), str(root / "noise.npz")
    assert main(["evaluate", str(run), "--data", d, "--split", "val", "--ood", noise]) == 0
    out = capsys.readouterr().out
    m = json.loads((run / "metrics.json").read_text())
    assert "note" not in m["conformal"]  # fitted on the calib-split hold-out of train, never the val split
    assert "(val): not a held-out estimate" in m["ood"]["note"] and out.count("not a held-out estimate") == 1
    assert main(["evaluate", str(run), "--data", d, "--ood", noise]) == 0  # the test split: held out from both
    capsys.readouterr()
    m = json.loads((run / "metrics.json").read_text())
    assert "note" not in m["conformal"] and "note" not in m["ood"]
    assert main(["calibrate", str(run), "--data", d, "--coverage", "0.9"]) == 0  # now the sets are on val
    assert main(["evaluate", str(run), "--data", d, "--split", "val"]) == 0
    out = capsys.readouterr().out
    m = json.loads((run / "metrics.json").read_text())
    assert m["conformal"]["note"].startswith("measured on the split the sets were fitted on (val)")
    assert "conformal sets" in out and "(note: measured on the split the sets were fitted on (val)" in out
    card = json.loads((run / "model.json").read_text())
    assert card["calibration"]["fitted_on"] == "val" and "conformal" not in card["calibration"]


def test_fitted_here_knows_which_splits_overlap():
    from imgcls.evaluation.trust import fitted_here

    assert fitted_here("val", "val") and fitted_here("val", "all") and fitted_here("calib_split", "train")
    assert not fitted_here("calib_split", "val") and not fitted_here("val", "test") and not fitted_here(None, "val")


# ---------------------------------------------------------------------- API and messages
def test_from_config_takes_the_data_forms_fit_takes(tiny_npz):
    from imgcls.api import Classifier
    from tests.conftest import pattern_images

    cfg = {"model": "reference_cnn", "seed": 0}
    by_path = Classifier.from_config(cfg, str(tiny_npz))
    assert by_path.classes == ["a", "b", "c"] and by_path.preprocessing.in_chans == 1
    assert by_path.preprocessing.img_size == 16  # the data's native size, as from loaded ImageData
    x, y = pattern_images(10, size=16)
    by_arrays = Classifier.from_config(cfg, (x, y))
    assert len(by_arrays.classes) == 3 and by_arrays.preprocessing.img_size == 16
    by_name = Classifier.from_config(cfg, "digits")
    assert len(by_name.classes) == 10 and by_name.preprocessing.in_chans == 1


def test_a_missing_threshold_is_named_in_plain_english():
    from imgcls.api import Classifier
    from imgcls.engine.trust import Trust
    from imgcls.errors import ImgclsError

    clf = Classifier.create("reference_cnn", classes=["a", "b"], in_chans=1, img_size=16, seed=0)
    with pytest.raises(ImgclsError) as e:
        Trust(clf, reject=True)
    line = e.value.oneline()
    assert "has no unknown threshold (" in line and "no an " not in line and "--ood-method energy" in line
