"""One photo, one model input: the decode-once cache (training's validation, evaluate,
calibrate, the export check) and the file / PIL / array roads of predict and the server
must hand the model the same pixels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.data.cache import CacheSpec, center_crop
from imgcls.data.decode import load_image
from imgcls.data.pipeline import as_split, eval_batches
from imgcls.data.transforms import Preprocessing

# landscape and portrait photos whose resized long side takes every value from 73 to 110
# px at 64 px input (round(64 / 0.875) = 73 px shorter side): both parities of every centre offset
SIZES = [(w, 150) for w in range(150, 227, 2)] + [(150, h) for h in range(151, 227, 2)]


def photo(path, w, h, seed):
    rng = np.random.default_rng(seed)
    gx = np.linspace(0, 255, w)[None, :, None]
    gy = np.linspace(0, 255, h)[:, None, None]
    px = (0.5 * gx + 0.3 * gy + rng.integers(0, 60, (h, w, 3))).clip(0, 255).astype(np.uint8)
    Image.fromarray(px).save(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("crop")
    return [photo(d / f"p{i}.png", w, h, i) for i, (w, h) in enumerate(SIZES)]


PRE = Preprocessing(img_size=64, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3, resize="shorter_side", crop_pct=0.875)


def from_cache(path):
    spec = CacheSpec.for_preprocessing(PRE)
    return center_crop(spec.decode(path)[None], PRE.img_size)[0]


def test_cache_square_then_crop_equals_the_file_transform(photos):
    """The cache stores round(S / crop_pct) square; its centre S crop must be the pixels
    Preprocessing.pil_transform gives for the file (rounding the two centre offsets
    separately used to shift some photos by 1 px)."""
    for p in photos:
        direct = PRE.pil_transform()(load_image(p, 3))
        assert torch.equal(from_cache(p), direct), p.name


def test_predict_roads_agree_on_a_photo_model(photos):
    """Files, PIL images and arrays of the same photos give the model the same batch."""
    def batch(split):
        (x, *_), = list(eval_batches(split, PRE, batch_size=len(photos), workers=0))
        return x

    def stack(images):
        out = []
        for im in images:  # one call per image: the photos have different sizes
            split, _ = as_split(im, PRE)
            out.append(batch(split))
        return torch.cat(out)

    files = stack(photos)
    pils = stack([Image.open(p).convert("RGB") for p in photos])
    arrays = stack([np.asarray(Image.open(p).convert("RGB")) for p in photos])
    cached = torch.stack([from_cache(p) for p in photos])
    assert torch.equal(files, pils)
    assert torch.equal(files, arrays)
    assert torch.equal(files, cached)


def test_arrays_at_the_stored_size_are_still_centre_cropped():
    """An array already at the cache's stored size (round(S / crop_pct) square) is what the
    decode-once cache holds: it is centre-cropped, as before."""
    side = CacheSpec.for_preprocessing(PRE).side
    x = torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8)
    split, _ = as_split(x, PRE)
    (got, *_), = list(eval_batches(split, PRE, batch_size=2, workers=0))
    assert torch.equal(got, center_crop(x, PRE.img_size))



def test_a_pil_image_with_exif_orientation_is_predicted_upright_as_its_file(tmp_path):
    """Image.open(path) of a JPEG with EXIF orientation 6 gave the model the sideways pixels
    (as_split skipped exif_transpose) while the file road turned it upright."""
    path = tmp_path / "rotated.jpg"
    im = Image.open(photo(tmp_path / "src.png", 120, 90, 7))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    im.save(path, quality=95, exif=exif.tobytes())

    def batch(images):
        split, _ = as_split(images, PRE)
        (x, *_), = list(eval_batches(split, PRE, batch_size=1, workers=0))
        return x

    upright = batch(path)
    assert torch.equal(batch(Image.open(path)), upright)
    sideways = PRE.pil_transform()(Image.open(path).convert("RGB"))[None]
    assert not torch.equal(sideways, upright)  # the orientation matters for this photo
