"""Fuzzing (hypothesis, derandomized, bounded) of what users hand-edit: CSV/TSV manifests
and model cards' ``preprocessing``. A fuzzed input gives a valid result or an
ImgclsError, never another exception."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgcls.data.intensity import parse_intensity
from imgcls.data.manifest import from_manifest
from imgcls.data.records import ImageData
from imgcls.data.transforms import Preprocessing
from imgcls.errors import ImgclsError

FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# cells that mean something to the parser, and cells that should not break it
CELLS = st.one_of(
    st.sampled_from(["path", "file", "filename", "image", "label", "class", "split", "train", "val", "valid",
                     "validation", "test", "", " ", "a.jpg", "b/c.png", "/abs/x.jpg", "~/x.jpg", "~nosuchuser/x.jpg",
                     "cat", "dog", "ütf-8 ✓", '"quoted, cell"', "a\tb", "x;y", "\x00", "\ufeff", "C:\\win\\x.jpg",
                     "..", "../up.jpg", "%s", "{}"]),
    st.text(max_size=12),
)
ROWS = st.lists(st.lists(CELLS, min_size=0, max_size=5), min_size=0, max_size=8)
SEPARATORS = st.sampled_from([",", ";", "\t", "|"])
NEWLINES = st.sampled_from(["\n", "\r\n", "\r"])

_DIR = Path(tempfile.mkdtemp(prefix="imgcls-fuzz-"))


def _manifest_result(text: str, suffix: str) -> None:
    path = _DIR / f"m{suffix}"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        data = from_manifest(path)
    except ImgclsError as exc:
        assert exc.message and "\n" not in str(exc)
        return
    assert isinstance(data, ImageData) and len(data.classes) >= 2 and len(data.train) > 0
    for split in (data.train, data.val, data.test):
        if split is not None:
            assert len(split.paths) == len(split.labels)
            assert int(split.labels.max()) < len(data.classes)


@FUZZ
@given(rows=ROWS, sep=SEPARATORS, newline=NEWLINES, suffix=st.sampled_from([".csv", ".tsv"]))
def test_fuzzed_manifest_rows(rows, sep, newline, suffix):
    _manifest_result(newline.join(sep.join(r) for r in rows), suffix)


@FUZZ
@given(text=st.text(max_size=200), suffix=st.sampled_from([".csv", ".tsv"]))
def test_fuzzed_manifest_text(text, suffix):
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return  # not encodable as a file's UTF-8
    _manifest_result(text, suffix)


def test_fuzzed_manifest_bytes_that_are_not_utf8():
    for raw in (b"\xff\xfe\x00p\x00a", b"path,label\n\xe9t\xe9.jpg,cat\n", b"\x80" * 10):
        (_DIR / "b.csv").write_bytes(raw)
        with pytest.raises(ImgclsError, match="cannot read manifest"):
            from_manifest(_DIR / "b.csv")


ANY = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                             st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20)),
                   lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                   max_leaves=8)
NUMBERS = st.lists(st.one_of(st.floats(-2, 2), st.integers(-1, 3)), min_size=1, max_size=3)
PLAUSIBLE = {
    "img_size": st.one_of(st.integers(-3, 300), ANY),
    "in_chans": st.one_of(st.sampled_from([1, 3]), ANY),
    "mean": st.one_of(NUMBERS, ANY),
    "std": st.one_of(NUMBERS, ANY),
    "resize": st.one_of(st.sampled_from(["squash", "shorter_side", "crop"]), ANY),
    "crop_pct": st.one_of(st.floats(-1, 2), ANY),
    "interpolation": st.one_of(st.sampled_from(["bilinear", "bicubic", "nearest", "cubic"]), ANY),
    "intensity": st.one_of(st.sampled_from(["auto", "minmax", "percentile:1,99", "window:-5,5", "window:5,-5"]), ANY),
    "bit_depth": st.one_of(st.sampled_from([8, 16, 12]), ANY),
    "frames": st.one_of(st.sampled_from(["first", "all", "some"]), ANY),
}


@FUZZ
@given(card=st.one_of(st.fixed_dictionaries({}, optional=PLAUSIBLE), ANY,
                      st.dictionaries(st.text(max_size=10), ANY, max_size=6)))
def test_fuzzed_model_card_preprocessing(card):
    try:
        pre = Preprocessing.from_dict(card)
    except ImgclsError as exc:
        assert exc.message.startswith("model card: preprocessing") and "\n" not in str(exc)
        return
    assert pre.img_size >= 1 and len(pre.mean) == len(pre.std) == pre.in_chans
    assert all(s > 0 for s in pre.std) and pre.bit_depth in (8, 16) and pre.frames in ("first", "all")
    pre.pil_transform()  # a valid card builds its pipeline
    assert Preprocessing.from_dict(pre.to_dict()) == pre  # and saves back to the same card


@FUZZ
@given(text=st.one_of(st.text(max_size=30), st.from_regex(r"(percentile|window):-?[0-9.e]{1,6},-?[0-9.e]{1,6}")))
def test_fuzzed_intensity_settings(text):
    try:
        setting = parse_intensity(text)
    except ImgclsError:
        return
    assert parse_intensity(str(setting)) == setting  # what model.json stores reads back the same
