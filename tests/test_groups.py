"""Splits that do not leak (--group-by), the audit's group check, the training leak hint."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.cli import main
from imgcls.data.groups import dhash, folds, group_of, leak_hint, near_pairs_across
from imgcls.data.sources import load_data
from imgcls.errors import ImgclsError
from tests.conftest import pattern_images


def _manifest(root: Path, groups: int = 12, per_group: int = 3, split: bool = False) -> Path:
    """Images in groups (sessions); each group holds one image of each of 3 classes."""
    x, y = pattern_images(groups * per_group // 3 + 1, size=20, channels=3)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for g in range(groups):
        for c in range(3):
            idx = np.nonzero(y == c)[0][g]
            name = f"sess{g:02d}_img{c}.png"
            Image.fromarray(x[idx]).save(root / name)
            rows.append({"path": name, "label": f"c{c}", "run": str(g), "split": ("val" if g == 0 and c == 0 else "")})
    path = root / "data.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label", "run"] + (["split"] if split else []), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _groups_by_split(data, by):
    return {s: set(group_of(data, getattr(data, s), by)) for s in ("train", "val")}


@pytest.mark.parametrize("by", ["run", r"sess(\d+)_"])
def test_grouped_holdout_keeps_each_group_on_one_side(tmp_path, by):
    data = load_data(_manifest(tmp_path / "m"), val_split=0.25, seed=3, group_by=by)
    g = _groups_by_split(data, by)
    assert g["train"] and g["val"] and not g["train"] & g["val"]
    assert len(data.val) % 3 == 0 and any("grouped" in n for n in data.notes)


def test_random_holdout_splits_groups(tmp_path):
    data = load_data(_manifest(tmp_path / "m"), val_split=0.25, seed=3)
    assert _groups_by_split(data, "run")["train"] & _groups_by_split(data, "run")["val"]


def test_folds_are_grouped_and_cover_everything():
    labels = torch.arange(60) % 3
    groups = [str(i // 3) for i in range(60)]
    seen = []
    for tr, va in folds(labels, 5, 0, groups):
        assert not {groups[i] for i in tr} & {groups[i] for i in va}
        seen += va.tolist()
    assert sorted(seen) == list(range(60))


def test_bad_group_by_is_one_line(tmp_path):
    m = _manifest(tmp_path / "m")
    with pytest.raises(ImgclsError, match="matches none of the 36 file paths"):
        load_data(m, group_by=r"patient(\d+)")
    with pytest.raises(ImgclsError, match="neither a manifest column nor a valid regex"):
        load_data(m, group_by="sess(")
    with pytest.raises(ImgclsError, match="array data set"):
        x, y = pattern_images(5)
        np.savez(tmp_path / "a.npz", x_train=x, y_train=y)
        load_data(tmp_path / "a.npz", group_by="run")


def test_cli_train_bad_regex_is_one_line(tmp_path, capsys):
    m = _manifest(tmp_path / "m")
    assert main(["train", "--data", str(m), "--group-by", "nomatch(\\d)", "--epochs", "1",
                 "--out", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--group-by 'nomatch(\\d)' matches none" in err[0]


def test_audit_reports_groups_across_splits(tmp_path, capsys):
    m = _manifest(tmp_path / "m", split=True)  # run 0 has one image in val, two in train
    assert main(["audit", str(m), "--group-by", "run", "--no-pixels", "--json"]) == 1
    import json

    r = json.loads(capsys.readouterr().out)
    spans = [f for f in r["findings"] if f["kind"] == "group_across_splits"]
    assert r["groups_across_splits"] == 1 and len(spans) == 1 and len(spans[0]["files"]) == 3
    assert "group '0'" in spans[0]["message"]


def test_dhash_near_pairs_and_leak_hint():
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.integers(0, 255, (6, 3, 8, 8), dtype=np.uint8))
    imgs = torch.nn.functional.interpolate(base.float(), size=(48, 48), mode="bilinear").to(torch.uint8)
    noisy = (imgs.int() + torch.randint(-2, 3, imgs.shape)).clamp(0, 255).to(torch.uint8)
    h = dhash(imgs)
    assert h.dtype == np.uint64 and len(set(h.tolist())) == 6
    assert (0, 0) in near_pairs_across(h[:3], dhash(noisy[:1]))
    assert near_pairs_across(h[:3], h[3:]) == []
    assert "--group-by" in leak_hint(imgs[:4], noisy[2:3])
    assert leak_hint(imgs[:3], imgs[3:]) is None
    assert leak_hint(imgs[:, :, :28, :28], imgs[:, :, :28, :28]) is None  # too small to hash


@pytest.mark.slow
@pytest.mark.shared_data
def test_signdigits_grouped_by_run_and_by_file_name(shared_data, tmp_path):
    src = shared_data / "signdigits"
    rows = list(csv.DictReader((src / "runs.csv").open()))
    m = tmp_path / "runs_nosplit.csv"
    with m.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "run"])
        w.writerows([[str(src / r["path"]), r["label"], r["run"]] for r in rows])
    data = load_data(m, val_split=0.2, seed=0, group_by="run")
    g = _groups_by_split(data, "run")
    assert not g["train"] & g["val"] and 0.1 < len(data.val) / len(rows) < 0.3
    # the folder, grouped by the hundreds of the file number (IMG_11xx, ...): whole runs, mostly
    data = load_data(src, val_split=0.2, seed=0, group_by=r"IMG_(\d\d)\d\d")
    g = _groups_by_split(data, r"IMG_(\d\d)\d\d")
    assert not g["train"] & g["val"] and len(g["val"]) >= 2


def test_training_names_the_flag_when_val_has_near_copies_of_train(tmp_path, capsys):
    from imgcls import train

    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(8):  # each photo twice, a little noise apart (burst shots)
            small = torch.from_numpy(rng.integers(0, 255, (1, 3, 6, 6)).astype(np.float32))
            base = torch.nn.functional.interpolate(small, size=(40, 40), mode="bilinear")[0].permute(1, 2, 0)
            base = base.numpy().astype(np.int16)  # smooth, like a photo (hashes stably)
            for k in range(2):
                img = np.clip(base + rng.integers(-2, 3, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(tmp_path / "d" / c / f"{i}_{k}.png")
    train({"data": str(tmp_path / "d"), "epochs": 1, "batch_size": 8, "val_split": 0.3, "img_size": 32,
           "out": str(tmp_path / "runs")}, progress=False)
    err = capsys.readouterr().err
    assert "near-identical image in train" in err and "--group-by" in err


@pytest.mark.slow
@pytest.mark.shared_data
def test_signdigits_audit_group_by_run(shared_data, capsys):
    import json

    main(["audit", str(shared_data / "signdigits" / "runs.csv"), "--group-by", "run", "--no-pixels", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["groups_across_splits"] == 0  # its own split is grouped by run


def test_train_group_by_is_recorded_and_evaluate_rebuilds_the_same_split(tmp_path, capsys):
    import json

    m = _manifest(tmp_path / "m", groups=10)
    assert main(["train", "--data", str(m), "--group-by", "run", "--val-split", "0.3", "--epochs", "1",
                 "--img-size", "20", "--out", str(tmp_path / "runs"), "--name", "g"]) == 0
    run = tmp_path / "runs" / "g"
    tr = json.loads((run / "metrics.json").read_text())["training"]
    assert tr["group_by"] == "run" and tr["val_images"] % 3 == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(m), "--split", "val", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["num_images"] == tr["val_images"]


def test_group_by_matches_a_manifest_column_case_insensitively(tmp_path):
    path = _manifest(tmp_path / "m")
    text = path.read_text().splitlines()
    path.write_text("\n".join(["path,label,Run", *text[1:]]) + "\n")
    data = load_data(path, val_split=0.25, seed=0, group_by="Run")
    by_split = _groups_by_split(data, "Run")
    assert by_split["train"] and by_split["val"] and not by_split["train"] & by_split["val"]
