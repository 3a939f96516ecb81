"""High bit depth and float images: --intensity maps them the same way everywhere
(pil_transform, the decode cache, a saved model), 16-bit data can stay 16-bit through the
cache, and old model cards still load."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.cli import main
from imgcls.config import TrainConfig
from imgcls.data.cache import CacheSpec, center_crop, decoded_split
from imgcls.data.decode import load_image
from imgcls.data.intensity import parse_intensity
from imgcls.data.records import Split
from imgcls.data.transforms import BatchResizedCrop, Preprocessing
from imgcls.errors import ImgclsError

PRE = Preprocessing(img_size=16, in_chans=1, mean=(0.5,), std=(0.25,))


def narrow16(path, lo=291, hi=694):
    arr = np.linspace(lo, hi, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(arr).save(path)
    return arr


def float_tif(path):
    arr = np.linspace(-3.1, 3.1, 16 * 16, dtype=np.float32).reshape(16, 16)
    Image.fromarray(arr, "F").save(path)
    return arr


def test_narrow_16bit_and_float_keep_their_levels(tmp_path):
    narrow16(tmp_path / "n.tif")
    float_tif(tmp_path / "f.tif")
    old_way = np.round(np.asarray(Image.open(tmp_path / "n.tif"), np.float64) / 65535 * 255)
    assert len(np.unique(old_way)) == 3  # the issue: 65535 -> 255 left three grey levels
    for name in ("n.tif", "f.tif"):
        auto = np.asarray(load_image(tmp_path / name, 1, intensity="auto"))
        assert auto.min() == 0 and auto.max() == 255 and len(np.unique(auto)) > 200, name
        assert np.all(np.diff(auto.reshape(-1).astype(int)) >= 0)  # monotone: order of values kept
    # an explicit window: values below black, above white, linear between
    w = np.asarray(load_image(tmp_path / "f.tif", 1, intensity="window:-1,1")).reshape(-1)
    values = np.linspace(-3.1, 3.1, 256, dtype=np.float32)
    assert np.all(w[values <= -1] == 0) and np.all(w[values >= 1] == 255)
    mid = (values > -1) & (values < 1)
    assert np.abs(w[mid] - np.round((values[mid] + 1) / 2 * 255)).max() <= 1
    full = np.asarray(load_image(tmp_path / "n.tif", 1, intensity="full-range"))
    assert full.max() <= 3  # what full-range means for 291..694 out of 0..65535
    mm = np.asarray(load_image(tmp_path / "n.tif", 1, intensity="minmax"))
    assert mm.min() == 0 and mm.max() == 255


def test_intensity_settings_parse_and_refuse():
    assert str(parse_intensity("percentile")) == "percentile:0.5,99.5"
    assert str(parse_intensity(" Window:-1000,400 ")) == "window:-1000,400"
    for bad in ("percentile:99,1", "window:1", "gamma", "percentile:-1,50", "window:nan,3", ""):
        with pytest.raises(ImgclsError, match="intensity"):
            parse_intensity(bad)
    assert TrainConfig.from_dict({"intensity": "percentile:1,99"}).intensity == "percentile:1,99"
    with pytest.raises(ImgclsError, match=r"invalid value for 'intensity' \(--intensity\)"):
        TrainConfig.from_dict({"intensity": "gamma"})


def test_the_setting_reaches_every_decode_path_and_the_cache_key(tmp_path):
    narrow16(tmp_path / "n.tif")
    split = Split(labels=torch.zeros(1, dtype=torch.long), paths=[tmp_path / "n.tif"])
    outs = {}
    for setting in ("auto", "full-range", "window:400,500"):
        pre = dataclasses.replace(PRE, intensity=setting)
        direct = pre.pil_transform()(load_image(tmp_path / "n.tif", 1))  # predict / export / serve path
        cached = decoded_split(split, pre, cache_root=tmp_path / "cache", workers=0)  # train / evaluate path
        assert torch.equal(center_crop(cached.split.images, 16)[0], direct), setting
        outs[setting] = direct
    assert not torch.equal(outs["auto"], outs["full-range"]) and not torch.equal(outs["auto"], outs["window:400,500"])
    keys = {CacheSpec.for_preprocessing(dataclasses.replace(PRE, intensity=s)).key for s in outs}
    assert len(keys) == 3 and all(CacheSpec.from_key(k).key == k for k in keys)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == sorted(keys)


def test_16bit_through_the_cache_and_the_batch_ops(tmp_path):
    arr = narrow16(tmp_path / "n.tif", 1000, 60000)
    pre = dataclasses.replace(PRE, bit_depth=16, intensity="full-range")
    split = Split(labels=torch.zeros(1, dtype=torch.long), paths=[tmp_path / "n.tif"])
    d = decoded_split(split, pre, cache_root=tmp_path / "cache", workers=0)
    x = d.split.images
    assert x.dtype == torch.uint16 and x.shape == (1, 1, 16, 16)
    assert torch.equal(x[0, 0].to(torch.int32), torch.from_numpy(arr.astype(np.int32)))  # every 16-bit level kept
    again = decoded_split(split, pre, cache_root=tmp_path / "cache", workers=0)
    assert again.decoded == 0 and torch.equal(again.split.images, x)  # read back from the uint16 rows
    spec = CacheSpec.for_preprocessing(pre)
    assert (tmp_path / "cache" / spec.key / "images.u8").stat().st_size == 16 * 16 * 2
    # normalised on the device as 8-bit data is: same float for the same brightness
    as8 = torch.from_numpy(np.round(arr / 65535 * 255).astype(np.uint8))[None, None]
    assert torch.allclose(pre.normalize(x), PRE.normalize(as8), atol=0.02)
    crops = BatchResizedCrop(8, (0.5, 1.0), hflip=True)(x.expand(4, -1, -1, -1).contiguous())
    assert crops.dtype == torch.uint16 and crops.shape == (4, 1, 8, 8) and int(crops.to(torch.int32).max()) > 255
    eight = PRE.pil_transform()(load_image(tmp_path / "n.tif", 1))
    assert eight.dtype == torch.uint8  # the default model stays 8-bit


def test_model_card_roundtrip_and_old_cards():
    pre = dataclasses.replace(PRE, intensity="window:-1000,400", bit_depth=16, frames="all")
    card = json.loads(json.dumps(pre.to_dict()))
    assert Preprocessing.from_dict(card) == pre
    old = {"img_size": 28, "in_chans": 1, "mean": [0.5], "std": [0.5], "resize": "squash", "crop_pct": 1.0,
           "interpolation": "bilinear"}  # a card written before intensity / bit_depth / frames
    loaded = Preprocessing.from_dict(old)
    assert (loaded.intensity, loaded.bit_depth, loaded.frames) == ("auto", 8, "first")
    for bad, field in [({**old, "intensity": "gamma"}, "intensity"), ({**old, "bit_depth": 12}, "bit_depth"),
                       ({**old, "std": [0.0]}, "std"), ({**old, "mean": [0.5, 0.5]}, "mean"), ([], "preprocessing")]:
        with pytest.raises(ImgclsError, match=field):
            Preprocessing.from_dict(bad)


def test_train_flags_reach_the_model_card(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(4):
            arr = (np.full((12, 12), 300 + 40 * i + (200 if c == "b" else 0))).astype(np.uint16)
            arr[::2] += 50
            Image.fromarray(arr).save(tmp_path / "d" / c / f"{i}.tif")
    code = main(["train", "--data", str(tmp_path / "d"), "--img-size", "12", "--epochs", "1", "--workers", "0",
                 "--out", str(tmp_path / "runs"), "--name", "r", "--intensity", "window:250,800",
                 "--bit-depth", "16", "--no-cache", "--augment", "none"])
    assert code == 0
    card = json.loads((tmp_path / "runs" / "r" / "model.json").read_text())
    assert card["preprocessing"]["intensity"] == "window:250,800" and card["preprocessing"]["bit_depth"] == 16
    assert "intensity: window:250,800" in (tmp_path / "runs" / "r" / "config.yaml").read_text()


def test_unreadable_file_in_a_16_bit_predict_batch(tmp_path):
    """The blank stand-in for an unreadable file has the batch's dtype (uint16 at 16 bits)."""
    import numpy as np
    import torch
    from PIL import Image

    from imgcls.data.loaders import Batches
    from imgcls.data.records import Split
    from imgcls.data.transforms import Preprocessing

    good = tmp_path / "good.png"
    Image.fromarray(np.full((20, 20), 40_000, dtype=np.uint16)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    pre = Preprocessing(img_size=16, in_chans=1, mean=(0.5,), std=(0.5,), bit_depth=16)
    skipped: dict[int, str] = {}
    b = Batches(Split(labels=torch.zeros(2, dtype=torch.long), paths=[good, bad]), 2, transform=pre.pil_transform(),
                channels=1, size=16, workers=0, skipped=skipped)
    [(x, _)] = list(b)
    assert x.dtype == torch.uint16 and list(skipped) == [1]


def test_predict_every_frame_of_a_multi_frame_dicom(tmp_path):
    """frames=all: prediction gives a row per frame (file#frameN), as training and
    evaluation decode them; an unreadable file keeps its row, with the reason."""
    pytest.importorskip("pydicom")
    import shutil

    from pydicom.data import get_testdata_file

    from imgcls import Classifier

    shutil.copy(get_testdata_file("rtdose.dcm"), tmp_path / "dose.dcm")  # 15 frames
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")  # 1 frame
    (tmp_path / "broken.dcm").write_bytes(b"DICM" * 10)
    clf = Classifier.create("reference_cnn", num_classes=2, in_chans=1, img_size=16, seed=0)
    clf.preprocessing = dataclasses.replace(clf.preprocessing, frames="all")
    preds = clf.predict([tmp_path / "ct.dcm", tmp_path / "dose.dcm", tmp_path / "broken.dcm"], precision="fp32")
    names = [p.source for p in preds]
    assert names[0] == str(tmp_path / "ct.dcm") and len(preds) == 1 + 15 + 1
    assert names[1:16] == [f"{tmp_path / 'dose.dcm'}#frame{i}" for i in range(15)]
    assert all(p.label for p in preds[:16]) and preds[16].error and "broken.dcm" in preds[16].error
    assert len(clf.predict(tmp_path / "dose.dcm", precision="fp32")) == 15
    clf.preprocessing = dataclasses.replace(clf.preprocessing, frames="first")  # the default: the first frame
    assert len(clf.predict(tmp_path / "dose.dcm", precision="fp32")) == 1


def test_16bit_colour_is_mapped_with_one_window_over_its_channels():
    """A 16-bit colour image (decode's deep_image) maps like 16-bit grey, all channels together."""
    from imgcls.data.intensity import deep_image, map_8bit, map_16bit

    rgb = np.zeros((2, 3, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 1000, 2000, 3000
    img = deep_image(rgb)
    assert np.asarray(map_8bit(img, parse_intensity("minmax"), 3))[0, 0].tolist() == [0, 128, 255]
    assert np.asarray(map_8bit(img, parse_intensity("window:0,4000"), 3))[0, 0].tolist() == [64, 128, 191]
    assert map_16bit(img, parse_intensity("full-range"), 3)[:, 0, 0].tolist() == [1000, 2000, 3000]
    assert np.asarray(img)[0, 0].tolist() == [0, 128, 255]  # what plain-RGB readers see: its auto mapping
