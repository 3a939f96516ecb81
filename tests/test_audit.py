"""imgcls audit: every kind of problem is found and named; a clean set exits 0."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from imgcls.cli import main
from imgcls.data.audit import _near_pairs, audit_files
from imgcls.data.sources import load_data
from tests.imagefiles import jpeg_bytes, noise, write_bad_files


def clean_tree(root, n=8):
    for split in ("train", "val"):
        for c_i, c in enumerate(("cat", "dog")):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed = 1000 * (split == "val") + 100 * c_i + i
                (root / split / c / f"{i}.jpg").write_bytes(jpeg_bytes(noise(48, 64, seed=seed)))
    return root


def by_kind(report):
    out = {}
    for f in report["findings"]:
        out.setdefault(f["kind"], []).append(f)
    return out


def test_clean_folder_exits_0(tmp_path, capsys):
    root = clean_tree(tmp_path / "clean")
    assert main(["audit", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clean"] and report["counts"] == {"train": {"cat": 8, "dog": 8}, "val": {"cat": 8, "dog": 8}}
    assert report["formats"] == {"JPEG": 32} and report["modes"] == {"RGB": 32}
    assert report["shorter_side"] == {"32-63": 32} and report["imbalance_ratio"] == 1.0


def test_every_problem_is_found(tmp_path, capsys):
    root = clean_tree(tmp_path / "d")
    tr, va = root / "train", root / "val"
    shutil.copy(tr / "cat" / "0.jpg", va / "cat" / "leak.jpg")  # same bytes in train and val
    shutil.copy(tr / "cat" / "1.jpg", tr / "dog" / "conflict.jpg")  # same bytes, other label
    shutil.copy(tr / "dog" / "2.jpg", tr / "dog" / "copy.jpg")  # duplicate within a class
    img = Image.open(tr / "cat" / "3.jpg")
    buf = io.BytesIO()
    img.resize((96, 72)).save(buf, "JPEG", quality=70)  # re-encoded, resized: a near duplicate
    (tr / "cat" / "near.jpg").write_bytes(buf.getvalue())
    (tr / "dog" / "tiny.jpg").write_bytes(jpeg_bytes(noise(12, 20, seed=5)))
    (tr / "dog" / "wide.jpg").write_bytes(jpeg_bytes(noise(40, 200, seed=6)))
    (tr / "cat" / "flat.jpg").write_bytes(jpeg_bytes(np.full((48, 64, 3), 90, np.uint8)))
    Image.fromarray(noise(48, 64, seed=77)).convert("P").save(tr / "cat" / "odd.gif")
    write_bad_files(tr / "dog")
    assert main(["audit", str(root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    kinds = by_kind(report)
    names = {k: sorted({p.split("/")[-1] for f in v for p in f["files"]}) for k, v in kinds.items()}
    assert {f["files"][0].split("/")[-1]: f["message"].split(" (")[0] for f in kinds["unreadable"]} == {
        "truncated.jpg": "truncated or corrupt", "zero.jpg": "empty file", "text.jpg": "not an image",
        "bomb.png": "too many pixels"}
    assert names["identical_across_splits"] == ["0.jpg", "leak.jpg"]
    assert names["identical_conflicting_labels"] == ["1.jpg", "conflict.jpg"]
    assert names["identical_within_class"] == ["2.jpg", "copy.jpg"]
    assert names["near_identical_within_class"] == ["3.jpg", "near.jpg"]
    assert names["tiny"] == ["tiny.jpg"] and names["extreme_aspect"] == ["wide.jpg"]
    assert names["nearly_constant"] == ["flat.jpg"]
    assert names["format_outlier"] == ["odd.gif"] and names["mode_outlier"] == ["odd.gif"]
    assert {f["severity"] for f in kinds["identical_across_splits"]} == {"error"}
    # the human table names them too
    assert main(["audit", str(root)]) == 1
    table = capsys.readouterr().out
    assert "identical_across_splits" in table and "odd.gif" in table and "leakage" in table


def test_no_pixels_mode_reads_headers_only(tmp_path):
    root = clean_tree(tmp_path / "d", n=3)
    shutil.copy(root / "train" / "cat" / "0.jpg", root / "val" / "dog" / "x.jpg")
    report = audit_files(load_data(root, val_split=0.0), pixels=False, workers=0)
    assert not report["pixels_checked"] and [f["kind"] for f in report["findings"]] == [
        "identical_conflicting_labels", "identical_across_splits"]


def test_manifest_audit_finds_the_same_file_in_two_splits(tmp_path, capsys):
    root = clean_tree(tmp_path / "d", n=3)
    rows = [f"train/{c}/{i}.jpg,{c},train" for c in ("cat", "dog") for i in range(3)]
    rows.append("train/cat/0.jpg,cat,test")  # listed twice: leakage
    (root / "list.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    assert main(["audit", str(root / "list.csv"), "--json"]) == 1
    kinds = by_kind(json.loads(capsys.readouterr().out))
    assert list(kinds) == ["identical_across_splits"]
    assert kinds["identical_across_splits"][0]["message"] == "2 identical images in test and train (leakage)"


def test_near_pairs_band_search_matches_brute_force():
    rng = np.random.default_rng(0)
    base = [int(h) for h in rng.integers(0, 2**63, size=200, dtype=np.int64)]
    hashes = list(enumerate(base))
    for j, h in enumerate(base[:50]):  # near copies with 1..4 flipped bits
        flip = sum(1 << int(b) for b in rng.choice(64, size=1 + j % 4, replace=False))
        hashes.append((200 + j, h ^ flip))
    brute = sorted((a, b) for (a, ha) in hashes for (b, hb) in hashes if a < b and bin(ha ^ hb).count("1") <= 3)
    assert _near_pairs(hashes, 3) == brute and len(brute) >= 35


@pytest.mark.shared_data
def test_hymenoptera_audit_names_the_gif(shared_data, capsys):
    assert main(["audit", str(shared_data / "hymenoptera"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    kinds = by_kind(report)
    assert [f["files"] for f in kinds["format_outlier"]] == [[str(shared_data / "hymenoptera/train/ants/imageNotFound.gif")]]
    assert report["files"] == 398 and report["readable"] == 398 and report["formats"] == {"JPEG": 397, "GIF": 1}


def test_array_data_audit(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    y = np.arange(30) % 3
    xt = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    yt = np.arange(6) % 3
    clean = tmp_path / "clean.npz"
    np.savez(clean, x_train=x, y_train=y, x_test=xt, y_test=yt)
    assert main(["audit", str(clean), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clean"] and report["files"] == 36 and report["shape"] == [3, 32, 32]
    assert report["counts"] == {"train": {"0": 10, "1": 10, "2": 10}, "test": {"0": 2, "1": 2, "2": 2}}

    x[1] = x[0]  # labels 0 and 1: conflicting
    xt[0] = x[5]  # train image 5 in the test split: leakage
    x[3] = x[6]  # both label 0: a duplicate within the class
    x[9] = 128  # one colour
    x[12] = np.clip(x[15].astype(int) + rng.integers(-3, 4, x[15].shape), 0, 255)  # noisy copy, both label 0
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=x, y_train=y, x_test=xt, y_test=yt)
    assert main(["audit", str(bad), "--json"]) == 1
    kinds = by_kind(json.loads(capsys.readouterr().out))
    assert kinds["identical_conflicting_labels"][0]["files"] == ["train[0]", "train[1]"]
    assert kinds["identical_across_splits"][0]["files"] == ["train[5]", "test[0]"] or \
        sorted(kinds["identical_across_splits"][0]["files"]) == ["test[0]", "train[5]"]
    assert kinds["identical_within_class"][0]["files"] == ["train[3]", "train[6]"]
    assert kinds["nearly_constant"][0]["files"] == ["train[9]"]
    assert kinds["near_identical_within_class"][0]["files"] == ["train[12]", "train[15]"]
    assert main(["audit", str(bad)]) == 1  # the table
    assert "images in arrays, shape 3x32x32" in capsys.readouterr().out


def test_labels_csv_is_validated_against_the_data(tmp_path, capsys):
    """--labels FILE: a binary file, a CSV without the issues.csv columns and a CSV written for
    other data each get one line naming the file (they were an internal error, '0 label issues,
    clean' and nonsense paths)."""
    root = clean_tree(tmp_path / "d", n=2)
    cat0 = str(root / "train" / "cat" / "0.jpg")

    def audit_with(name, text=None, raw=None):
        f = tmp_path / name
        f.write_bytes(raw) if raw is not None else f.write_text(text)
        rc = main(["audit", str(root), "--no-pixels", "--labels", str(f)])
        return rc, capsys.readouterr()

    header = "index,path,given_label,suggested_label,score\n"
    rc, out = audit_with("ok.csv", header + f"0,{cat0},cat,dog,0.1\n")
    assert "label issues: 1" in out.out and not out.err
    for name, body, needle in [
            ("bin.csv", None, "is not a readable CSV"),
            ("ab.csv", "a,b\n", "is not an imgcls label-issues CSV: no index, given_label"),
            ("empty.csv", "", "is not an imgcls label-issues CSV"),
            ("cls.csv", header + f"0,{cat0},zebra,dog,0.1\n", "given label 'zebra' is not a class of"),
            ("idx.csv", header + f"99,{cat0},cat,dog,0.1\n", "index 99 is not a training image"),
            ("path.csv", header + f"0,{tmp_path}/other/cat/0.jpg,cat,dog,0.1\n", "is not a training file of")]:
        rc, out = audit_with(name, body, raw=b"\xff\xfe\x00\x81binary\x00" * 20 if body is None else None)
        err = out.err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and needle in err[0] and name in err[0], (name, out.err)


def test_16bit_colour_file_stats_use_all_16_bits(tmp_path):
    """Pillow's decode keeps a 16-bit colour file's high byte (1000..3000 -> 3..11): the
    audit's contrast figure (and dHash) would see an almost flat image."""
    from imgcls.data.audit import inspect_file
    from tests.test_decode import _rgb16, _write16

    for name in ("c.png", "c.tif"):
        info = inspect_file(str(_write16(tmp_path, _rgb16(), name)))
        assert not info.get("error") and (info["width"], info["height"]) == (64, 8)
        assert info["std"] > 30, (name, info["std"])  # the auto window stretches 1000..3000 to 0..255
