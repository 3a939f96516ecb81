"""Every common image format and mode decodes to the right pixels; broken files give
the right one-line reason."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from imgcls.data.decode import UnreadableImage, load_image
from tests.imagefiles import bomb_png, jpeg_bytes, noise, png16_rgb, write_bad_files


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


def test_jpeg_cmyk_and_progressive(tmp_path):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[..., 0], rgb[:, :12, 1] = 200, 100
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    (tmp_path / "prog.jpg").write_bytes(jpeg_bytes(rgb, progressive=True))
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    for name in ("cmyk.jpg", "prog.jpg"):
        img = load_image(tmp_path / name, 3)
        assert img.mode == "RGB" and img.size == (24, 16)
        assert np.abs(px(img)[4:12, 2:10] - [200, 100, 0]).max() <= 8
        assert np.abs(px(img)[4:12, 16:22] - [200, 0, 0]).max() <= 8


def test_png_bit_depths_palette_and_alpha(tmp_path):
    g16 = np.array([[0, 257 * 10, 32768, 65535]], np.uint16).repeat(3, 0)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert Image.open(tmp_path / "g16.png").mode == load_image(tmp_path / "g16.png", 1).mode  # kept for the model
    assert px(load_image(tmp_path / "g16.png", 1, intensity="auto"))[0].tolist() == [0, 10, 128, 255]  # scaled
    (tmp_path / "rgb16.png").write_bytes(png16_rgb(np.full((4, 5, 3), [40000, 65535, 0], np.uint16)))
    assert px(load_image(tmp_path / "rgb16.png", 3))[0, 0].tolist() == [156, 255, 0]
    Image.fromarray(np.array([[0, 255, 0, 255]], np.uint8) > 0).save(tmp_path / "bw.png")  # 1-bit
    assert Image.open(tmp_path / "bw.png").mode == "1"
    assert px(load_image(tmp_path / "bw.png", 1))[0].tolist() == [0, 255, 0, 255]
    pal = Image.new("P", (3, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putdata([0, 1, 0])
    pal.save(tmp_path / "pal.png")
    assert px(load_image(tmp_path / "pal.png", 3))[0].tolist() == [[10, 20, 30], [200, 100, 50], [10, 20, 30]]
    # alpha is composited on white, not dropped: a transparent pixel becomes white
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[0, :, 3], rgba[1, 0, 3] = 255, 255, 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = px(load_image(tmp_path / "rgba.png", 3))
    assert out[0, 0].tolist() == [255, 0, 0] and out[1, 1].tolist() == [255, 255, 255]
    assert out[1, 0].tolist() == [255, 127, 127]  # half transparent red over white
    la = Image.fromarray(np.stack([np.full((2, 2), 40, np.uint8), np.array([[255, 0], [255, 0]], np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert px(load_image(tmp_path / "la.png", 1)).tolist() == [[40, 255], [40, 255]]
    trans = Image.new("P", (2, 1))
    trans.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    trans.putdata([0, 1])
    trans.save(tmp_path / "ptrans.png", transparency=0)  # palette entry 0 is transparent
    assert px(load_image(tmp_path / "ptrans.png", 3))[0].tolist() == [[255, 255, 255], [0, 255, 0]]


def test_webp_bmp_tiff_gif(tmp_path):
    rgb = noise(12, 10, seed=1)
    Image.fromarray(rgb).save(tmp_path / "a.webp", lossless=True)
    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    Image.fromarray(rgb).save(tmp_path / "a.tif")
    for name in ("a.webp", "a.bmp", "a.tif"):
        assert np.array_equal(px(load_image(tmp_path / name, 3)), rgb.astype(int)), name
    Image.fromarray(np.full((3, 3), 65535, np.uint16)).save(tmp_path / "g16.tif")
    assert px(load_image(tmp_path / "g16.tif", 1, intensity="auto")).min() == 255  # constant: its place in 0..65535
    frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (30, 220)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    assert set(px(load_image(tmp_path / "anim.gif", 1)).flatten()) == {30}  # the first frame


def test_exif_orientation_is_applied(tmp_path):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:8, :8] = 255  # white square top-left
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = px(load_image(tmp_path / "rot.jpg", 1))
    assert out.shape == (40, 20)  # portrait after rotation
    assert out[:6, -6:].mean() > 240 and out[:6, :6].mean() < 15  # the square moved to the top right


def test_reduced_jpeg_decode_keeps_the_requested_side(tmp_path):
    (tmp_path / "big.jpg").write_bytes(jpeg_bytes(noise(600, 800)))
    assert load_image(tmp_path / "big.jpg", 3, min_side=140).size == (200, 150)  # 1/4 scale: >= 140
    assert load_image(tmp_path / "big.jpg", 3, min_side=300).size == (400, 300)
    assert load_image(tmp_path / "big.jpg", 3).size == (800, 600)


def test_bad_files_give_their_reason(tmp_path):
    expected = write_bad_files(tmp_path)
    for name, reason in expected.items():
        with pytest.raises(UnreadableImage) as err:
            load_image(tmp_path / name)
        assert err.value.reason.startswith(reason) and name in str(err.value), (name, err.value.reason)
    with pytest.raises(UnreadableImage, match="not found"):
        load_image(tmp_path / "missing.png")


def test_bomb_header_refused_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png(50_000, 50_000))
    with pytest.raises(UnreadableImage, match=r"bomb.png: Image size \(2500000000 pixels\) exceeds limit"):
        load_image(tmp_path / "bomb.png")
    # between 1x and 2x the limit Pillow only warns; imgcls refuses those too
    (tmp_path / "big.png").write_bytes(bomb_png(10_000, 12_000))
    with pytest.raises(UnreadableImage, match=r"claims 10000x12000 = 120 Mpx, over the 89 Mpx limit"):
        load_image(tmp_path / "big.png")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_permissions(tmp_path):
    p = tmp_path / "locked.jpg"
    p.write_bytes(jpeg_bytes(noise(8, 8)))
    p.chmod(0)
    with pytest.raises(UnreadableImage, match="permission denied"):
        load_image(p)


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG of (H, W, C) uint16, C = 2 (grey + alpha), 3 (RGB) or 4 (RGBA): Pillow cannot write one."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, {2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _rgb16() -> np.ndarray:
    v = np.linspace(1000, 3000, 64)[None, :].repeat(8, 0)
    return np.stack([v, v / 2, v / 4], -1).round().astype(np.uint16)  # R = 2 G = 4 B


def _write16(tmp_path, arr: np.ndarray, name: str):
    import tifffile

    p = tmp_path / name
    if name.endswith(".png"):
        p.write_bytes(_png16(arr))
    else:
        tifffile.imwrite(p, arr, photometric="rgb", extrasamples=["unassalpha"] if arr.shape[-1] == 4 else None)
    return p


def test_16bit_colour_png_and_tiff_keep_their_levels(tmp_path):
    """Pillow decodes 16 bits a colour channel at 8 (the high byte: 1000..3000 became 3..11)."""
    from imgcls.data.decode import to_mode

    rgb = _rgb16()
    png, tif = _write16(tmp_path, rgb, "c.png"), _write16(tmp_path, rgb, "c.tif")
    outs = [px(load_image(p, 3, intensity="auto")) for p in (png, tif)]
    assert (outs[0] == outs[1]).all()
    assert len(np.unique(outs[0][..., 0])) > 40 and outs[0].max() >= 250  # stretched, not 3..11
    assert (outs[0][..., 0] >= outs[0][..., 1]).all() and (outs[0][..., 1] >= outs[0][..., 2]).all()
    win = px(load_image(png, 3, intensity="window:0,4000"))  # one window for all channels: ratios kept
    assert np.abs(win[..., 0] - 2 * win[..., 1]).max() <= 2 and np.abs(win[..., 1] - 2 * win[..., 2]).max() <= 2
    assert (px(to_mode(Image.open(png), 3)) == px(load_image(png, 3))).all()  # an Image.open handed in
    assert len(np.unique(px(load_image(png, 1, intensity="auto")))) > 40  # grey model: 16-bit luma


def test_16bit_colour_keeps_16_bits_with_bit_depth_16(tmp_path):
    from imgcls.data.intensity import map_16bit, parse_intensity

    rgb = _rgb16()
    for name in ("c.png", "c.tif"):
        out = map_16bit(load_image(_write16(tmp_path, rgb, name), 3), parse_intensity("full-range"), 3)
        assert out.shape == (3, 8, 64) and np.abs(out - rgb.transpose(2, 0, 1)).max() < 0.5


def test_16bit_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint16)
    rgba[..., 0] = 30000
    rgba[0, :, 3], rgba[1, 0, 3] = 65535, 32768  # opaque row, half, transparent
    for name in ("a.png", "a.tif"):
        out = px(load_image(_write16(tmp_path, rgba, name), 3, intensity="full-range"))
        assert out[0, 0].tolist() == [117, 0, 0] and out[1, 1].tolist() == [255, 255, 255]
        assert out[1, 0].tolist() == [186, 127, 127]  # half of 30000 + half of white
    la = np.stack([np.full((2, 2), 20000), np.array([[65535, 0], [65535, 0]])], -1).astype(np.uint16)
    grey = load_image(_write16(tmp_path, la, "la.png"), 1)
    assert grey.mode == "I;16" and np.asarray(grey).tolist() == [[20000, 65535], [20000, 65535]]


def test_16bit_colour_without_its_package_names_it(tmp_path, monkeypatch):
    from imgcls.data import formats

    real = formats.plugin_available
    monkeypatch.setattr(formats, "plugin_available", lambda fmt: fmt not in ("PNG16", "TIFF16") and real(fmt))
    for name, pip in (("c.png", "pip install imagecodecs"), ("c.tif", "pip install tifffile imagecodecs")):
        with pytest.raises(UnreadableImage) as exc:
            load_image(_write16(tmp_path, _rgb16(), name), 3)
        assert exc.value.reason == f"unsupported format — {pip}" and name in str(exc.value)
