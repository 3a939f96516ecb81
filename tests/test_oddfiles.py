"""A class folder of odd files (tests/oddfiles.py): each is decoded to the right pixels or
listed with its reason, in the folder source, the decode pass's skipped.csv and the
audit, and nothing in the folder goes unaccounted for."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pillow_heif")
pytest.importorskip("pillow_jxl")
pytest.importorskip("pydicom")

from PIL import Image

from imgcls.data import formats
from imgcls.data.audit import audit_files
from imgcls.data.decode import load_image
from imgcls.data.decode_pass import decode_data
from imgcls.data.sources import from_folder
from imgcls.data.transforms import Preprocessing
from tests.oddfiles import Decoded, Listed, Passed, every_entry, write_corpus

PRE = Preprocessing(img_size=24, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs POSIX links and FIFOs")
    root = tmp_path_factory.mktemp("odd")
    return root, write_corpus(root)


def rel(root: Path, p) -> str:
    return os.path.relpath(p, root / "odd")


def test_every_file_is_decoded_listed_or_passed_over(corpus, tmp_path):
    root, expected = corpus
    assert every_entry(root / "odd") == set(expected)  # the corpus holds exactly the cases below
    data = from_folder(root)
    odd = data.classes.index("odd")
    candidates = {rel(root, p) for p, y in zip(data.train.paths, data.train.labels.tolist()) if y == odd}
    passed = {rel(root, p): why for _, p, why in data.passed_over}
    assert passed == {k: v.why for k, v in expected.items() if isinstance(v, Passed)}
    assert candidates == {k for k, v in expected.items() if not isinstance(v, Passed)}
    prepared = decode_data(data, PRE, cache=False, workers=0, report_dir=tmp_path, announce=False)
    with open(tmp_path / "skipped.csv", newline="") as f:
        listed = {rel(root, r["path"]): r["reason"] for r in csv.DictReader(f)}
    for name, want in expected.items():
        if isinstance(want, Listed):
            assert listed.get(name, "").startswith(want.reason), (name, listed.get(name))
    assert set(listed) == {k for k, v in expected.items() if isinstance(v, Listed)}
    decoded = len(prepared.data.train) - 2  # the two plain/ images
    assert decoded == sum(isinstance(v, Decoded) for v in expected.values())
    accounted = set(listed) | set(passed) | (candidates - set(listed))
    assert accounted == every_entry(root / "odd")  # nothing unaccounted for


@pytest.mark.parametrize("name", ["plain.png", "photo.jfif", "no_extension", "png_named.jpg", "iphone.heic",
                                  "web.avif", "new.jxl", "favicon.ico", "full16.tif", "narrow16.tif",
                                  "float32.tif", "ct.dcm", "ct_monochrome1.dcm", "mr_scan", "dose_15frames.dcm",
                                  "colour.dcm", "sub/nested.png"])
def test_decoded_pixels_match_the_reference(corpus, name):
    root, expected = corpus
    want = expected[name]
    assert isinstance(want, Decoded)
    got = np.asarray(load_image(root / "odd" / name, want.channels, intensity="auto")).astype(int)
    assert got.shape == want.reference.shape, name
    assert np.abs(got - want.reference.astype(int)).max() <= want.tol, name


def test_the_audit_accounts_for_the_same_files(corpus):
    root, expected = corpus
    report = audit_files(from_folder(root), pixels=True, workers=0)
    unreadable = {rel(root, f["files"][0]): f["message"] for f in report["findings"] if f["kind"] == "unreadable"}
    for name, want in expected.items():
        if isinstance(want, Listed):
            assert unreadable.get(name, "").startswith(want.reason), (name, unreadable.get(name))
    assert set(unreadable) == {k for k, v in expected.items() if isinstance(v, Listed)}
    n_decoded = sum(isinstance(v, Decoded) for v in expected.values())
    assert report["readable"] == n_decoded + 2 and report["files"] == len(unreadable) + n_decoded + 2
    assert report["passed_over"] == {"hidden file": 2, "sidecar": 5}
    assert {rel(root, f["path"]) for f in report["passed_over_files"]} == \
        {k for k, v in expected.items() if isinstance(v, Passed)}
    assert report["formats"]["DICOM"] == 5 and report["formats"]["HEIF"] == 1 and report["formats"]["ICO"] == 1


def test_a_missing_plugin_is_named_not_dropped(corpus, monkeypatch, tmp_path):
    root, _ = corpus
    real = formats.plugin_available
    monkeypatch.setattr(formats, "plugin_available", lambda fmt: fmt not in ("HEIF", "JXL", "DICOM") and real(fmt))
    data = from_folder(root)
    prepared = decode_data(data, PRE, cache=False, workers=0, report_dir=tmp_path, announce=False)
    reasons = {rel(root, p): why for _, p, why in prepared.skipped}
    assert reasons["iphone.heic"] == "unsupported format — pip install pillow-heif"
    assert reasons["new.jxl"] == "unsupported format — pip install pillow-jxl-plugin"
    assert reasons["mr_scan"] == reasons["ct.dcm"] == "unsupported format — pip install pydicom"
    report = audit_files(data, pixels=False, workers=0)
    audit_reasons = {rel(root, f["files"][0]): f["message"] for f in report["findings"] if f["kind"] == "unreadable"}
    assert audit_reasons["iphone.heic"] == "unsupported format — pip install pillow-heif"


def test_every_frame_of_a_multiframe_dicom_with_frames_all(corpus, tmp_path):
    import dataclasses

    root, _ = corpus
    data = from_folder(root)
    first = decode_data(data, PRE, cache=False, workers=0, announce=False)
    every = decode_data(data, dataclasses.replace(PRE, frames="all"), cache=False, workers=0, announce=False)
    assert len(every.data.train) == len(first.data.train) + 14  # rtdose.dcm: 15 frames, 14 more images
    # each decoded row names its file, and its frame where a file gave several (reports name them)
    dose = str(root / "odd" / "dose_15frames.dcm")
    sources = every.data.train.sources
    assert [s for s in sources if s.startswith(dose)] == [f"{dose}#frame{k}" for k in range(15)]
    good = [str(p) for p in data.train.paths if str(p) not in {str(q) for _, q, _ in first.skipped}]
    assert first.data.train.sources == good
    sub = every.data.train.subset(torch.tensor([len(sources) - 1, 0]))
    assert sub.sources == [sources[-1], sources[0]]
    frames = [load_image(root / "odd" / "dose_15frames.dcm", 1, frame=i, intensity="auto") for i in (0, 7)]
    assert not np.array_equal(np.asarray(frames[0]), np.asarray(frames[1]))


def test_a_link_from_a_class_folder_up_to_the_data_root_is_a_symlink_loop(tmp_path):
    from PIL import Image

    from imgcls.data.decode import scan_folder
    from imgcls.data.sources import from_folder

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / c / f"{c}{i}.png")
    os.symlink("..", tmp_path / "cat" / "loop")
    assert scan_folder(tmp_path / "cat").files == [tmp_path / "cat" / p for p in ("cat0.png", "cat1.png", "loop")]
    d = from_folder(tmp_path)
    cats = [p.name for p, lab in zip(d.train.paths, d.train.labels.tolist()) if lab == 0]
    assert cats == ["cat0.png", "cat1.png", "loop"]  # the loop is a candidate that is reported, no dog is a cat


def test_a_16bit_colour_png_without_imagecodecs_is_named(monkeypatch, tmp_path):
    """Not decoded at 8 bits (Pillow's high byte): listed with the package to install."""
    from tests.test_decode import _png16, _rgb16

    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / "data" / cls / "ok.png")
    (tmp_path / "data" / "a" / "deep.png").write_bytes(_png16(_rgb16()))
    real = formats.plugin_available
    monkeypatch.setattr(formats, "plugin_available", lambda fmt: fmt != "PNG16" and real(fmt))
    data = from_folder(tmp_path / "data")
    prepared = decode_data(data, PRE, cache=False, workers=0, report_dir=tmp_path, announce=False)
    assert {p.name: why for _, p, why in prepared.skipped} == {"deep.png": "unsupported format — pip install imagecodecs"}
    report = audit_files(data, pixels=False, workers=0)
    found = [f["message"] for f in report["findings"] if f["kind"] == "unreadable"]
    assert found == ["unsupported format — pip install imagecodecs"]
