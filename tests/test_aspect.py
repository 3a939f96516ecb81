"""Extreme aspect ratios: the shorter-side resize (photo preprocessing) must cost what its
output costs. A 551-byte PNG of 1 x 120000 px had its 1 px side stretched to 73 px, so the
resize built a 73 x 8.8 M px tensor (seconds and gigabytes per request) of which only the
centre 73 x 73 square survives; ordinary images must keep exactly their old pixels."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import _geometry

from imgcls.data.cache import CacheSpec, center_crop
from imgcls.data.decode import load_image
from imgcls.data.pipeline import as_split, eval_batches
from imgcls.data.transforms import ASPECT_LIMIT, LongSideCrop, Preprocessing

PRE = Preprocessing(img_size=64, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3, resize="shorter_side", crop_pct=0.875)
PRE16 = dataclasses.replace(PRE, in_chans=1, mean=(0.5,), std=(0.5,), bit_depth=16, intensity="full-range")
SIDE = CacheSpec.for_preprocessing(PRE).side  # 73


def old_road(pre: Preprocessing) -> v2.Compose:
    """The transform as it was: the same ops without the long-side crop."""
    return v2.Compose([op for op in pre.pil_transform().transforms if not isinstance(op, LongSideCrop)])


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    gx = np.linspace(0, 255, w)[None, :, None]
    gy = np.linspace(0, 255, h)[:, None, None]
    return Image.fromarray((0.5 * gx + 0.3 * gy + rng.integers(0, 60, (h, w, 3))).clip(0, 255).astype(np.uint8))


def photo16(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    g = np.linspace(0, 40000, w)[None, :] + np.linspace(0, 20000, h)[:, None]
    return Image.fromarray((g + rng.integers(0, 5000, (h, w))).astype(np.uint16))


@pytest.fixture
def resizes(monkeypatch):
    """Every resize torchvision runs, as (input shape, output size); one handed more than a
    bounded tensor fails at once (before the old road could allocate gigabytes)."""
    calls = []
    real = _geometry.interpolate

    def spy(x, size=None, **kw):
        calls.append((tuple(x.shape), tuple(size)))
        assert x.numel() <= 3 * SIDE * SIDE * 100, f"resize handed {tuple(x.shape)}"
        assert x.shape[1] * size[0] * size[1] <= 3 * SIDE * SIDE * 100, f"resize to {size}"
        return real(x, size=size, **kw)

    monkeypatch.setattr(_geometry, "interpolate", spy)
    return calls


def test_an_extreme_strip_is_resized_from_a_bounded_part(tmp_path, resizes):
    """1 x 200000 px (a few hundred bytes of PNG): the old road resized it to 73 x 14.6 M px
    (3.2 GB of uint8); every road now resizes a few dozen source rows."""
    Image.new("RGB", (1, 200_000), (200, 100, 0)).save(tmp_path / "strip.png")
    Image.new("RGB", (200_000, 1), (200, 100, 0)).save(tmp_path / "wide.png")
    colour = torch.tensor([200, 100, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 64, 64)
    for path in (tmp_path / "strip.png", tmp_path / "wide.png"):
        x = PRE.pil_transform()(load_image(path, 3))  # training, evaluation, the server
        assert x.shape == (3, 64, 64) and torch.equal(x, colour)
        split, _ = as_split(path, PRE)  # prediction from a file
        (batch, *_), = list(eval_batches(split, PRE, batch_size=1, workers=0))
        assert torch.equal(batch[0], colour)
        row = CacheSpec.for_preprocessing(PRE).decode(path)  # the decode-once cache
        assert row.shape == (3, SIDE, SIDE) and torch.equal(center_crop(row[None], 64)[0], colour)
    assert len(resizes) >= 6 and all(np.prod(shape) <= 3 * 100 for shape, _ in resizes)


@pytest.mark.parametrize("size", [(20, 2000), (2000, 20), (7, 3001), (3, 5000), (13, 4000), (2555, 301)])
def test_moderately_extreme_images_match_the_old_road(size):
    """Images the old road can still afford: the same pixels within one level (20 x 2000: the
    same source positions exactly; 7 x 3001: a scale off by 1e-4, under 1/100 px)."""
    im = photo(*size, seed=sum(size))
    new, old = PRE.pil_transform()(im), old_road(PRE)(im)
    diff = (new.int() - old.int()).abs()
    assert new.shape == old.shape == (3, 64, 64)
    assert diff.max() <= 1 and diff.float().mean() < 0.05
    im16 = photo16(*size, seed=sum(size))
    new, old = PRE16.pil_transform()(im16), old_road(PRE16)(im16)
    assert new.dtype == torch.uint16 and new.shape == (1, 64, 64)
    assert (new.int() - old.int()).abs().max() <= 8  # of 65535: float rounding of the weights


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1920, 1080), (1080, 1920), (150, 150), (800, 100),
                                  (100, 800), (75, 600)])
def test_ordinary_images_take_exactly_the_old_ops(size):
    """Up to ASPECT_LIMIT : 1 (panoramas included) the crop hands the image on untouched:
    the same tensors, bit for bit, 8-bit and 16-bit (float) roads."""
    assert max(size) <= ASPECT_LIMIT * min(size)
    im, im16 = photo(*size, seed=size[0]), photo16(*size, seed=size[1])
    t = v2.PILToTensor()(im)
    assert LongSideCrop(SIDE)(t) is t
    assert torch.equal(PRE.pil_transform()(im), old_road(PRE)(im))
    assert torch.equal(PRE16.pil_transform()(im16), old_road(PRE16)(im16))
    assert torch.equal(PRE.tensor_geometry()(t), v2.Compose(old_road(PRE).transforms[2:])(t))


@pytest.mark.parametrize("size", [(1, 3000), (3000, 2), (9, 1000), (301, 2555), (5, 100_000)])
def test_cache_and_file_roads_agree_on_extreme_images(tmp_path, size):
    """The decode-once cache (73 px square, then its centre 64) and the file transform
    choose the same part of a long image: evaluation and prediction see the same pixels."""
    path = tmp_path / "long.png"
    photo(*size, seed=3).save(path)
    cached = center_crop(CacheSpec.for_preprocessing(PRE).decode(path)[None], 64)[0]
    assert torch.equal(cached, PRE.pil_transform()(load_image(path, 3)))
