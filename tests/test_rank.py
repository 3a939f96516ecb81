"""imgcls rank (active learning) and Label Studio JSON both ways."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.cli import main
from imgcls.curation.rank import k_center, select, uncertainty
from imgcls.data.labelstudio import from_labelstudio
from imgcls.data.sources import load_data
from imgcls.errors import ImgclsError
from tests.conftest import pattern_images


@pytest.fixture
def pool_npz(tmp_path):
    x, _ = pattern_images(10, size=16, seed=5)
    path = tmp_path / "pool.npz"
    np.savez(path, x_unlabeled=x)
    return path


def test_uncertainty_strategies_pick_the_confusing_images():
    probs = np.array([[0.98, 0.01, 0.01], [0.4, 0.35, 0.25], [0.5, 0.49, 0.01], [0.34, 0.33, 0.33]])
    assert select("margin", probs, None, 2, 0, None) == [2, 3]
    assert select("entropy", probs, None, 1, 0, None) == [3]
    u = uncertainty(probs)
    assert np.allclose(u["confidence"], probs.max(1))


def test_k_center_spreads_over_clusters_and_avoids_labelled_ones():
    rng = np.random.default_rng(0)
    centres = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 5], [3, 3, 0]], np.float32)
    feats = torch.from_numpy(np.concatenate([c + 0.05 * rng.standard_normal((20, 3)) for c in centres]).astype(np.float32))
    picks = k_center(feats, 4, None)
    assert sorted(p // 20 for p in picks) == [0, 1, 2, 3]  # one per cluster
    picks = k_center(feats, 2, torch.from_numpy(centres[:2]))  # clusters 0 and 1 already labelled
    assert sorted(p // 20 for p in picks) == [2, 3]
    probs = np.full((80, 3), 1 / 3)
    assert len(set(select("hybrid", probs, feats.numpy(), 4, 0, None))) == 4


@pytest.mark.parametrize("strategy", ["margin", "hybrid", "coreset"])
def test_rank_writes_csv_labelstudio_tasks_and_page(trained_run, pool_npz, tmp_path, capsys, strategy):
    out = tmp_path / "ranked"
    assert main(["rank", str(trained_run), str(pool_npz), "--budget", "7", "--strategy", strategy,
                 "--out", str(out), "--json"]) == 0
    rows = list(csv.DictReader((out / "ranked.csv").open()))
    assert [int(r["rank"]) for r in rows] == list(range(1, 8)) and len({r["index"] for r in rows}) == 7
    tasks = json.loads((out / "tasks.json").read_text())
    assert len(tasks) == 7
    for t, r in zip(tasks, rows):  # Label Studio's documented import format, predictions pre-filled
        assert t["data"]["image"].startswith("/data/local-files/?d=")
        (res,) = t["predictions"][0]["result"]
        assert res["type"] == "choices" and res["from_name"] == "choice" and res["to_name"] == "image"
        assert res["value"]["choices"] == [r["predicted_label"]] and 0 <= t["predictions"][0]["score"] <= 1
        assert (out / "images" / f"{r['index']}.png").is_file()
    assert '<Choices name="choice" toName="image"' in (out / "label_config.xml").read_text()
    page = (out / "ranked.html").read_text()
    assert page.count("data:image/png;base64,") == 7 and "http" not in page


def _export(tasks_json, labels, cancelled=()):
    """What Label Studio's JSON export gives for imported tasks after labelling."""
    tasks = json.loads(tasks_json.read_text())
    for i, (t, lab) in enumerate(zip(tasks, labels)):
        t["id"] = i + 1
        t["annotations"] = [{"id": 100 + i, "was_cancelled": i in cancelled, "result": [
            {"id": f"r{i}", "type": "choices", "from_name": "choice", "to_name": "image",
             "value": {"choices": [lab]}}]}] if lab else []
    return tasks


def test_labelstudio_export_round_trip_trains(trained_run, pool_npz, tmp_path, capsys):
    out = tmp_path / "ranked"
    assert main(["rank", str(trained_run), str(pool_npz), "--budget", "8", "--out", str(out), "--json"]) == 0
    labels = ["a", "b", "c", "a", "b", "c", None, "a"]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(_export(out / "tasks.json", labels, cancelled=(7,))))
    data = load_data(export, val_split=0.0)
    assert data.classes == ["a", "b", "c"] and len(data.train) == 6 and "2 task(s)" in data.notes[0]
    # the same export, its images named only by the local-files URL (no data.path)
    tasks = json.loads(export.read_text())
    for t in tasks:
        del t["data"]["path"]
    export.write_text(json.dumps(tasks))
    import os

    os.environ.setdefault("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "/")
    assert [p.name for p in from_labelstudio(export).train.paths] == [f"{r}.png" for r in
                                                                     [t["data"]["index"] for t in tasks[:6]]]
    capsys.readouterr()
    assert main(["train", "--data", str(export), "--epochs", "1", "--batch-size", "4", "--val-split", "0",
                 "--out", str(tmp_path / "runs")]) == 0


def test_labelstudio_export_of_another_type_is_one_line(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    export = tmp_path / "boxes.json"
    export.write_text(json.dumps([{"id": 3, "data": {"image": str(tmp_path / "a.png")}, "annotations": [
        {"result": [{"type": "rectanglelabels", "value": {"rectanglelabels": ["car"]}}]}]}]))
    with pytest.raises(ImgclsError, match="task 3 has a 'rectanglelabels' annotation, not 'choices'"):
        load_data(export)
    assert main(["train", "--data", str(export), "--out", str(tmp_path / "runs")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_rank_bad_input_is_one_line(trained_run, pool_npz, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    assert main(["rank", str(trained_run), str(tmp_path / "empty"), "--budget", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no images" in err[0]
    assert main(["rank", str(trained_run), str(pool_npz), "--budget", "500", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--budget 500 is more than the 30 image(s)" in err[0] and "between 1 and 30" in err[0]


def test_rank_a_folder_pool_keeps_file_paths(trained_run, tmp_path, capsys):
    x, _ = pattern_images(3, size=16, seed=7)
    (tmp_path / "pool" / "sub").mkdir(parents=True)
    for i, img in enumerate(x):
        Image.fromarray(img).save(tmp_path / "pool" / ("sub" if i % 2 else "") / f"{i}.png")
    out = tmp_path / "r"
    assert main(["rank", str(trained_run), str(tmp_path / "pool"), "--budget", "4", "--strategy", "entropy",
                 "--out", str(out), "--json"]) == 0
    tasks = json.loads((out / "tasks.json").read_text())
    assert all(t["data"]["path"].startswith(str(tmp_path / "pool")) for t in tasks) and not (out / "images").exists()


def test_rank_refuses_a_multi_label_model(trained_run, pool_npz, tmp_path, capsys):
    """A multi-label model's independent sigmoids used to be softmaxed into single-choice tasks."""
    import shutil

    run = tmp_path / "ml_run"
    shutil.copytree(trained_run, run)
    card = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**card, "task": "multi"}))
    assert main(["rank", str(run), str(pool_npz), "--budget", "3", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "single-label models" in err[0] and "multi-label" in err[0]
    assert not (tmp_path / "o").exists()
