"""Safe artifacts: nothing is unpickled, tampering is refused, and the two entry points
that read untrusted bytes (image decoding, model cards) survive fuzzing with nothing
but the documented ImgclsError."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import shutil
import tempfile
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
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


@pytest.mark.parametrize("kwargs", [{"checkpoint_path": "PAYLOAD"}, {"pretrained_cfg_overlay": {"file": "PAYLOAD"}},
                                    {"pretrained": True}, {"cache_dir": "/tmp"}, {"drop_rate": [0.1]}])
def test_card_model_kwargs_outside_the_allow_list_are_refused(saved, tmp_path, monkeypatch, kwargs):
    """model_kwargs go to timm.create_model, which honours checkpoint_path (a file read, an
    unpickle with older torch) before the weights' sha256 is checked: only plain
    hyper-parameters pass, and nothing is read."""
    payload = tmp_path / "payload.pth"
    torch.save({"fc.weight": Payload()}, payload)
    loads: list = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or {})
    card = json.loads((saved / "model.json").read_text())
    card.update(architecture="resnet18",
                model_kwargs=json.loads(json.dumps(kwargs).replace("PAYLOAD", str(payload))))
    (saved / "model.json").write_text(json.dumps(card))
    with pytest.raises(ImgclsError) as e:
        Classifier.load(saved)
    assert "model_kwargs" in str(e.value) and next(iter(kwargs)) in str(e.value) and "\n" not in str(e.value)
    assert loads == []


def test_model_options_from_a_config_are_allow_listed(tmp_path):
    from imgcls.models import create_model
    from imgcls.models.pretrained import create_pretrained

    with pytest.raises(ImgclsError, match="'checkpoint_path' is not an option imgcls passes to resnet18"):
        create_model("resnet18", 3, checkpoint_path=str(tmp_path / "x.pth"))
    with pytest.raises(ImgclsError, match="'checkpoint_path' is not an option"):
        create_pretrained("resnet18", 3, weights=tmp_path / "w.pth", checkpoint_path="x")
    with pytest.raises(ImgclsError, match="'drop_rate' is not an option imgcls passes to reference_cnn"):
        create_model("reference_cnn", 3, drop_rate=0.2)
    model = create_model("resnet18", 3, in_chans=1, img_size=32, drop_rate=0.2)
    assert model.drop_rate == 0.2


def test_weights_are_hashed_and_loaded_from_the_same_bytes(saved, tmp_path, monkeypatch):
    """Whoever swaps model.safetensors just after it was read and hashed must not get the
    swapped file loaded: the bytes that were hashed are the bytes that are parsed."""
    import imgcls.artifact as artifact

    original = Classifier.load(saved).model.state_dict()
    weights = saved / "model.safetensors"
    other = Classifier.create("reference_cnn", num_classes=3, in_chans=1, img_size=16, seed=1)
    swapped = (other.save(tmp_path / "other") / "model.safetensors").read_bytes()
    done: list = []

    def swap_after_first_read(fn):
        def wrapped(path, *a, **kw):
            out = fn(path, *a, **kw)
            if Path(path) == weights and not done:
                done.append(weights.write_bytes(swapped))
            return out
        return wrapped

    monkeypatch.setattr(Path, "read_bytes", swap_after_first_read(Path.read_bytes))
    monkeypatch.setattr(artifact, "sha256sum", swap_after_first_read(artifact.sha256sum))
    state = Classifier.load(saved).model.state_dict()
    assert done and weights.read_bytes() == swapped  # the swap did happen during loading
    assert all(torch.equal(state[k], original[k]) for k in original)


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
              "tta": "none",
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


def _serve_seeds() -> list[bytes]:
    """The decoder seeds plus formats the service refuses (ICO, PPM, a PostScript header)."""
    buf = io.BytesIO()
    Image.new("RGBA", (16, 16), (200, 10, 10, 128)).save(buf, "ICO", sizes=[(16, 16)])
    return SEEDS + [buf.getvalue(), b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"]


SERVE_SEEDS = _serve_seeds()

# Found by fuzzing decode_upload (zlib + base64): a JPEG whose EXIF makes Pillow raise TypeError
# while exif_transpose rewrites it, one that raises struct.error, a TIFF with a rational where
# an integer belongs (TypeError) and one with a tag too large for C (OverflowError). Each
# answered 500 before the service caught them.
_FOUND = [
    "eNr7f+P/AwYBLzdPNwZGRgYGRiBk+P+QQc+1IjONgcHXl0GLgYGBg4GJUZ6BCchiSU7MZWAUYmBmAKllYwCD/7cZnBk42NjY"
    "2Vg52NnZOTk5uHhEeHm4uXkkhYT5RWSl5OVkpWRkFFT01HmVdJRlZDTMNXUMDE1MTOTVLW0tjGz0jE2MQIYwcnJy8nDzSPDy"
    "ShgpyigaEQAGGCL/DzAIcjCwM3AyMyoxMAkyMgsy/j/CIA90KysjGDBAASMTMwsrGzsHJxc3UMFWAaAHmZmZWJhZWVlYgLK1"
    "QHkGFkFWIUVDRzbhwER2pUIRo8aJCzmUnTYeFA26+EHFOKmoiZNLTFxCUkpVTV1DU8vE1MzcwtLK2cXVzd3D0ys4JDQsPCIy"
    "KjklNS09IzOruKS0rLyisqq5pbWtvaOza9LkKVOnTZ8xc9aixUuWLlu+YuWqTZu3bN22fcfOXYcOHzl67PiJk6cuXb5y9dr1"
    "GzdvPXz0+MnTZ89fvHz18dPnL1+/ff/x8xfIX4wMzIwwgNVfgkB/MbGwMLOwg/zFyFQOUiDIwqpoyCbkGMieWCisZNTIIeI0"
    "ceHGg5zKxkEfRJOKLnKJqZg8VP0I8hrYZ8R5rIksn4E8Nh/kMYS/bjHwMDMCI49ZkMGe4ee/Lo0F/P9vAgCPftPv",
    "eNr7f+P/AwYBLzdPNwZGRkYGEGT4/5CBx7UiM42BwdeXQev/bQZnBg42NnY2Vg52dnZOTg4uHhFeHm5uHkkhYX4RWSl5OVkp"
    "GRkFFT11BSUdZRkZDXNNHQNDExMTeXVLWwsjGz1jEyOQIYycnJw83DwSvLwSRooyikYkg/8HGAQ5GNgZOJkZlRiYBBmZBRn/"
    "H2GQZ2BgZGUEAwYoYGRiZmFlY+fg5OIGKtgqwMDEyMzMxMLMysrCApStBcozsAiyCikaOrIJByayKxWKGDVOXMih7LTxoGjQ"
    "xQ8qxklFTZxcYuISklKqauoamlompmbmFpZWzi6ubu4enl7BIaFh4RGRUckpqWnpGZlZxSWlZeUVlVXNLa1t7R2dXZMmT5k6"
    "bfqMmbMWLV6ydNnyFStXbdq8Zeu27Tt27jp0+MjRY8dPnDx16fKVq9eu37h56+Gjx0+ePnv+4uWrj58+f/n67fuPn79A/mJk"
    "YGaEAaz+EgT6i4mFhZmFHeQvRqZykAJBFlZFQzYhx0D2xEJhJaNGDhGniQs3HuRUNg76IJpUdJFLTMXkoepHkNfAPiPOY01k"
    "+QzuMYS/bjHwMDMCI49ZkMGeoa9LY/0Ee3P7/zcBKuPSiA==",
    "eNrz9NRi4GBgYOBiYGBkYWAEsjiBmBHKZgdiJkZmBmYg3QbEzEA2SByE2aBsJiAWZGQFs3uAWBQqDtIjhmSOOJS9F4hl4OaA"
    "VDEAXQCCXCfk6Igo0CqDzAUA7zg8nA==",
    "eNrz9NRi4GBgYOBiYGBkYWAEsjiBmBHKZgdiJkZmBmYg3QbEzEA2SByE2aBsJiAWZBQAs3uAWBQqDtIjhmSOOJStA8QySOaA"
    "AAcYcp2Q4zrRBiaHHgIAapU+ew==",
]
FOUND_UPLOADS = [zlib.decompress(base64.b64decode(z)) for z in _FOUND]


@fuzz_settings(500)
@example(data=FOUND_UPLOADS[0], channels=3)
@example(data=FOUND_UPLOADS[1], channels=3)
@example(data=FOUND_UPLOADS[2], channels=1)
@example(data=FOUND_UPLOADS[3], channels=3)
@given(data=st.one_of(mutated_images(), st.sampled_from(SERVE_SEEDS), st.binary(max_size=512)),
       channels=st.sampled_from([1, 3]))
def test_fuzz_decode_upload_gives_an_image_or_a_4xx(data, channels, monkeypatch_session_pixels):
    """What the web service does with uploaded bytes: a decoded image, or an UploadError
    with a 4xx status and a one-line message; never another exception (which would be a 500)."""
    from imgcls.serve.uploads import UploadError, decode_upload

    try:
        img = decode_upload(data, channels, max_bytes=1 << 20, max_pixels=500_000)
    except UploadError as exc:
        assert 400 <= exc.status < 500 and exc.message and "\n" not in exc.message
        return
    from imgcls.data.decode import HIGH_DEPTH_MODES

    # high-bit-depth uploads stay as they are: the model's intensity setting maps them next
    assert img.mode in (("L" if channels == 1 else "RGB"), *HIGH_DEPTH_MODES), img.mode
    assert img.width * img.height <= 500_000
    assert img.format in (None, "JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def test_predictions_for_a_file_name_that_is_not_utf8_are_written(trained_run, tmp_path, monkeypatch):
    """`a\\xffb.png` (not valid UTF-8) is written as its own bytes to -o FILE.csv and to a strict
    stdout, escaped in JSON: no internal UnicodeEncodeError, no predictions lost."""
    import sys

    from imgcls.cli import main

    name, imgs = os.fsdecode(b"a\xffb.png"), tmp_path / "imgs"
    imgs.mkdir()
    try:
        Image.new("L", (16, 16), 30).save(imgs / name, format="PNG")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses file names that are not valid UTF-8")
    Image.new("L", (16, 16), 200).save(imgs / "plain.png")
    assert main(["predict", str(trained_run), str(imgs), "-o", str(tmp_path / "out.csv")]) == 0
    lines = (tmp_path / "out.csv").read_bytes().splitlines()
    assert len(lines) == 3 and any(b"a\xffb.png," in line for line in lines)
    assert main(["predict", str(trained_run), str(imgs), "-o", str(tmp_path / "out.json")]) == 0
    assert {Path(r["source"]).name for r in json.loads((tmp_path / "out.json").read_text())} == {name, "plain.png"}
    strict = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", strict)  # a UTF-8 terminal outside the C locale
    assert main(["predict", str(trained_run), str(imgs), "--format", "csv"]) == 0
    strict.flush()
    assert b"a\xffb.png," in strict.buffer.getvalue()


@pytest.mark.parametrize("field,value,needle", [
    ("tta", "flip-shfit", "'tta' is 'flip-shfit', not one of none, flip, flip-shift"),
    ("tta", 3, "'tta' is 3,"),
    ("thresholds", {"values": {"0": 0.5, "1": 0.4}}, "no threshold in [0, 1] for class '2'"),
    ("thresholds", {"values": {"0": 0.5, "1": 0.4, "2": 1.5}}, "for class '2'"),
    ("thresholds", [0.5, 0.5, 0.5], "'thresholds.values' must map each class"),
])
def test_card_with_a_bad_tta_or_thresholds_is_refused(saved, field, value, needle, capsys):
    """A misspelt tta used to run flip TTA silently (and break export with a ValueError); a
    multi-label card missing a class's threshold, a KeyError at prediction."""
    from imgcls.cli import main

    card = json.loads((saved / "model.json").read_text())
    card.update({field: value, "task": "multi"} if field == "thresholds" else {field: value})
    (saved / "model.json").write_text(json.dumps(card))
    with pytest.raises(ImgclsError, match="model.json is invalid") as err:
        Classifier.load(saved)
    assert needle in str(err.value) and "\n" not in str(err.value)
    Image.new("L", (16, 16), 30).save(saved / "x.png")
    assert main(["predict", str(saved), str(saved / "x.png")]) == 1
    assert needle in capsys.readouterr().err


def test_tta_forward_refuses_an_unknown_mode():
    from imgcls.engine.tta import TTAModel, tta_forward

    net = torch.nn.Flatten()
    with pytest.raises(ImgclsError, match="unknown TTA mode 'flip-shfit' .*none, flip, flip-shift"):
        tta_forward(net, torch.zeros(1, 1, 4, 4), "flip-shfit")
    with pytest.raises(ImgclsError, match="unknown TTA mode"):
        TTAModel(net, "mirror")
