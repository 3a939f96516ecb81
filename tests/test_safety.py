"""Safe artifacts: nothing is unpickled, tampering is refused, and the two entry points
that read untrusted bytes (image decoding, model cards) survive fuzzing with nothing
but the documented ImgclsError."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgcls import Classifier, ImgclsError
from imgcls.artifact import read_card
from imgcls.data.decode import load_image
from imgcls.data.download import sha256sum
from imgcls.engine.checkpoint import load_checkpoint

MARKER = Path(tempfile.gettempdir()) / "imgcls-pickle-payload-ran"
# The suite runs a fixed, bounded set of examples (derandomized: the same every run);
# IMGCLS_FUZZ=N runs N random examples per target instead, for a longer hunt.
HUNT = int(os.environ.get("IMGCLS_FUZZ", "0"))


def fuzz_settings(n: int, **kw):
    return settings(max_examples=HUNT or n, derandomize=not HUNT, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, *kw.pop("health", [])], **kw)


class Payload:
    """What a malicious pickle does: run code on load (here: create a marker file)."""

    def __reduce__(self):
        return (open, (str(MARKER), "w"))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    clf = Classifier.create("reference_cnn", num_classes=3, in_chans=1, img_size=16, seed=0)
    return clf.save(tmp_path / "model")


@pytest.fixture(autouse=True)
def _no_marker():
    MARKER.unlink(missing_ok=True)
    yield
    assert not MARKER.exists(), "a pickle payload was executed"


def _set_sha(folder: Path) -> None:
    """An attacker controls both files: make the card's sha256 match the new weights."""
    card = json.loads((folder / "model.json").read_text())
    card["weights_sha256"] = sha256sum(folder / "model.safetensors")
    (folder / "model.json").write_text(json.dumps(card))


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_tampered_or_truncated_weights_are_refused(saved, damage):
    w = saved / "model.safetensors"
    data = bytearray(w.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) - 100]
    else:
        data += b"\0"
    w.write_bytes(bytes(data))
    with pytest.raises(ImgclsError, match="does not match the sha256 in model.json: it was altered or truncated"):
        Classifier.load(saved)


def test_truncated_weights_with_matching_card_are_refused(saved):
    w = saved / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    _set_sha(saved)
    with pytest.raises(ImgclsError, match="cannot read .*model.safetensors.*damaged"):
        Classifier.load(saved)


@pytest.mark.parametrize("kind", ["pickle", "torch"])
def test_pickle_payload_as_model_file_is_refused(saved, kind):
    w = saved / "model.safetensors"
    if kind == "pickle":
        w.write_bytes(pickle.dumps({"fc.weight": Payload()}, protocol=4))
    else:
        torch.save({"fc.weight": Payload()}, w)
    _set_sha(saved)
    with pytest.raises(ImgclsError, match="refused .* not safetensors; imgcls never unpickles"):
        Classifier.load(saved)


def test_card_without_sha256_is_refused(saved):
    card = json.loads((saved / "model.json").read_text())
    del card["weights_sha256"]
    (saved / "model.json").write_text(json.dumps(card))
    with pytest.raises(ImgclsError, match="no valid weights_sha256"):
        Classifier.load(saved)


def test_weights_file_outside_the_folder_is_refused(saved):
    card = json.loads((saved / "model.json").read_text())
    card["weights_file"] = "../../etc/passwd"
    (saved / "model.json").write_text(json.dumps(card))
    with pytest.raises(ImgclsError, match="invalid weights file"):
        Classifier.load(saved)


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "imgcls-checkpoint", "model": {}, "x": Payload()}, path)
    with pytest.raises(ImgclsError, match="contains pickled Python objects, which imgcls never loads"):
        load_checkpoint(path)
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ImgclsError, match="refused|pickle"):
        load_checkpoint(path)


def test_truncated_or_foreign_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "imgcls-checkpoint", "format_version": 1, "w": torch.ones(1000)}, path)
    assert load_checkpoint(path)["w"].sum() == 1000
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImgclsError, match="cannot read checkpoint .*(damaged|truncated)"):
        load_checkpoint(path)
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(ImgclsError, match="is not an imgcls checkpoint"):
        load_checkpoint(path)


# ---------------------------------------------------------------------- fuzzing
def _seeds() -> list[bytes]:
    """Small valid files of every format the decoder meets, as mutation seeds."""
    out = []
    img = Image.new("RGB", (9, 7), (10, 200, 30))
    for fmt, mode, kw in [("PNG", "RGB", {}), ("PNG", "I;16", {}), ("JPEG", "RGB", {"exif": b"Exif\0\0MM\0*"}),
                         ("GIF", "P", {}), ("BMP", "RGB", {}), ("TIFF", "RGB", {}), ("WEBP", "RGB", {}),
                         ("PNG", "RGBA", {}), ("PPM", "L", {})]:
        buf = io.BytesIO()
        im = img.convert(mode) if mode != "I;16" else Image.new("I;16", (5, 5), 40000)
        try:
            im.save(buf, fmt, **kw)
        except (OSError, KeyError, ValueError):
            im.save(buf, fmt)
        out.append(buf.getvalue())
    return out


SEEDS = _seeds()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "cut":
            del data[i:]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@fuzz_settings(600)
@given(data=st.one_of(mutated_images(), st.binary(max_size=512)), channels=st.sampled_from([1, 3]),
       suffix=st.sampled_from([".png", ".jpg", ".gif", ".bmp", ".tif", ".webp", ".ppm"]))
def test_fuzz_load_image_only_raises_imgcls_error(data, channels, suffix, monkeypatch_session_pixels):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz{suffix}"
        path.write_bytes(data)
        try:  # decoded and mapped as a model does (16-bit / float through --intensity auto)
            img = load_image(path, channels, intensity="auto")
        except ImgclsError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            return
        assert img.mode == ("L" if channels == 1 else "RGB") and img.size[0] > 0 and img.size[1] > 0


@pytest.fixture(scope="module")
def monkeypatch_session_pixels():
    """Fuzzed headers may claim huge sizes: a low pixel cap keeps every example fast
    (the refusal path is the same ImgclsError)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1_000_000
    yield
    Image.MAX_IMAGE_PIXELS = old


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                    | st.text(max_size=12),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=12)

VALID_CARD = {"format": "imgcls-model", "format_version": 1, "architecture": "reference_cnn", "num_classes": 3,
              "classes": ["a", "b", "c"], "model_kwargs": {}, "in_chans": 1, "img_size": 16, "temperature": 1.0,
              "preprocessing": {"img_size": 16, "in_chans": 1, "mean": [0.5], "std": [0.5], "resize": "squash",
                                "crop_pct": 1.0, "interpolation": "bilinear"}}


@st.composite
def mutated_cards(draw) -> dict:
    card = json.loads(json.dumps(VALID_CARD))
    for _ in range(draw(st.integers(1, 3))):
        pre = card.get("preprocessing")
        target = pre if isinstance(pre, dict) and pre and draw(st.booleans()) else card
        if not target:
            break
        key = draw(st.sampled_from(sorted(target)))
        if draw(st.integers(0, 4)) == 0:
            del target[key]
        else:
            target[key] = draw(JSON)
    return card


@fuzz_settings(250)
@given(content=st.one_of(mutated_cards().map(lambda c: json.dumps(c).encode()),
                         JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200)))
def test_fuzz_read_card_only_raises_imgcls_error(content):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "model.json").write_bytes(content)
        try:
            card = read_card(d)
        except ImgclsError as exc:
            assert "\n" not in str(exc)
            return
        assert isinstance(card, dict) and card["format"] == "imgcls-model"


@fuzz_settings(60, health=[HealthCheck.function_scoped_fixture])
@given(card=mutated_cards())
def test_fuzz_loading_a_model_with_a_damaged_card(card, saved):
    """A card that passes read_card must rebuild a model or fail with ImgclsError."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "m"
        shutil.copytree(saved, folder)
        good = json.loads((folder / "model.json").read_text())
        (folder / "model.json").write_text(json.dumps({**card, "weights_sha256": good["weights_sha256"]},
                                                      allow_nan=True))
        try:
            clf = Classifier.load(folder)
        except ImgclsError:
            return
        assert clf.num_classes == len(clf.classes)
        x = torch.zeros(1, clf.preprocessing.in_chans, 16, 16, dtype=torch.uint8)
        assert clf.predict_proba(x)[0].shape == (1, clf.num_classes)


def test_fuzz_seeds_decode():
    """The mutation seeds are valid images (so the fuzzer explores past the headers)."""
    with tempfile.TemporaryDirectory() as d:
        for i, data in enumerate(SEEDS):
            p = Path(d) / f"s{i}"
            p.write_bytes(data)
            assert load_image(p, 3, intensity="auto").mode == "RGB"  # 16-bit seeds: mapped as a model does
    assert os.path.exists(d) is False
