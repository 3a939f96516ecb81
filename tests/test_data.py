import hashlib
import http.server
import io
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.data import load_data
from imgcls.data.datasets import cifar10_from_binary_tar, digits
from imgcls.data.download import download
from imgcls.data.sources import from_folder, from_npz
from imgcls.data.split import stratified_split
from imgcls.data.transforms import BatchAugment, Preprocessing
from imgcls.errors import ImgclsError


def test_digits_are_28x28_uint8_with_fixed_test_split():
    d = digits()
    assert d.train.images.shape[1:] == (1, 28, 28) and d.train.images.dtype == torch.uint8
    assert len(d.train) + len(d.test) == 1797
    assert torch.equal(digits().test.labels, d.test.labels)  # same test images every time
    assert d.train.images.max() > 200


def test_npz_source_with_class_names(tiny_npz):
    d = load_data(tiny_npz, val_split=0.2, seed=0)
    assert d.classes == ["a", "b", "c"]
    assert d.channels == 1 and d.native_size == 16
    assert len(d.train) == 96 and len(d.val) == 24 and len(d.test) == 30
    assert d.val.class_counts(3) == [8, 8, 8]  # stratified
    assert "held out" in d.notes[0]


def test_npz_labels_out_of_range(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.array([0, 1, 2, 5]),
             class_names=np.array(["a", "b", "c"]))
    with pytest.raises(ImgclsError, match=r"label 5 but only 3 class names"):
        from_npz(p)
    np.savez(p, x_train=np.zeros((2, 8, 8), np.uint8), y_train=np.array([0, -1]))
    with pytest.raises(ImgclsError, match="negative label"):
        from_npz(p)


def test_npz_missing_keys_and_pickles_refused(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ImgclsError, match="no 'x_train'"):
        from_npz(p)
    np.savez(p, x_train=np.array([{"a": 1}], dtype=object), y_train=np.array([0]))
    with pytest.raises(ImgclsError, match="pickles"):
        from_npz(p)


def test_npz_wrong_channel_count(tmp_path):
    p = tmp_path / "c5.npz"
    np.savez(p, x_train=np.zeros((4, 8, 8, 5), np.uint8), y_train=np.array([0, 1, 0, 1]))
    with pytest.raises(ImgclsError, match="5 channels"):
        from_npz(p)


def test_folder_source_without_splits(photo_folder):
    d = load_data(photo_folder, val_split=0.25, seed=0)
    assert d.classes == ["cat", "dog", "fox"] and d.channels == 3
    assert len(d.train) + len(d.val) == 36 and d.test is None
    assert d.val.class_counts(3) == [3, 3, 3]


def test_folder_source_with_splits(split_folder):
    d = load_data(split_folder)
    assert [len(d.train), len(d.val), len(d.test)] == [24, 24, 24]
    assert d.notes == []


def test_folder_errors(tmp_path):
    with pytest.raises(ImgclsError, match="not found"):
        load_data(tmp_path / "nope" / "x")
    (tmp_path / "one" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "cat" / "a.png")
    with pytest.raises(ImgclsError, match="only one class"):
        from_folder(tmp_path / "one")
    (tmp_path / "one" / "dog").mkdir()
    with pytest.raises(ImgclsError, match="'.*dog' has no images"):
        from_folder(tmp_path / "one")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImgclsError, match="no class folders"):
        from_folder(tmp_path / "empty")


def test_unknown_dataset_suggests():
    with pytest.raises(ImgclsError, match="did you mean 'mnist'"):
        load_data("mnst")


def test_stratified_split_is_deterministic_and_keeps_singletons():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2])
    keep, hold = stratified_split(labels, 0.2, seed=3)
    keep2, hold2 = stratified_split(labels, 0.2, seed=3)
    assert torch.equal(hold, hold2) and len(hold) == 4
    assert 20 in keep.tolist()  # the single class-2 sample stays in train
    assert sorted(keep.tolist() + hold.tolist()) == list(range(21))


def test_batch_augment_shifts_each_image_differently():
    x = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    x[:, :, 4, 4] = 255
    out = BatchAugment(translate=2)(x, torch.Generator().manual_seed(0))
    positions = {tuple(torch.nonzero(img[0])[0].tolist()) for img in out}
    assert len(positions) > 5 and out.shape == x.shape and out.sum() == x.sum()
    flipped = BatchAugment(hflip=True)(x[:, :, :, :], torch.Generator().manual_seed(0))
    assert {tuple(torch.nonzero(img[0])[0].tolist()) for img in flipped} == {(4, 4), (4, 3)}


def test_preprocessing_converts_channels_and_size():
    pre = Preprocessing(img_size=12, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    out = pre.normalize(torch.full((2, 1, 8, 8), 255, dtype=torch.uint8))
    assert out.shape == (2, 3, 12, 12) and torch.allclose(out, torch.ones_like(out))
    pre1 = Preprocessing(img_size=8, in_chans=1, mean=(0.0,), std=(1.0,))
    gray = pre1.normalize(torch.full((1, 3, 8, 8), 255, dtype=torch.uint8))
    assert gray.shape == (1, 1, 8, 8) and torch.allclose(gray, torch.ones_like(gray), atol=1e-3)


# ----------------------------------------------------------------------------- downloads
class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: _Quiet(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_verifies_and_caches(http_root, tmp_path, monkeypatch):
    root, url = http_root
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    payload = b"hello imgcls" * 100
    (root / "f.bin").write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    path = download(url + "f.bin", "f.bin", sha)
    assert path.read_bytes() == payload
    (root / "f.bin").unlink()  # second call must not touch the network
    assert download(url + "f.bin", "f.bin", sha) == path
    (root / "g.bin").write_bytes(b"tampered")
    with pytest.raises(ImgclsError, match="checksum mismatch"):
        download(url + "g.bin", "g.bin", sha)
    assert not (tmp_path / "cache" / "datasets" / "g.bin").exists()


def test_download_falls_back_to_mirror_and_names_offline_option(http_root, tmp_path, monkeypatch):
    root, url = http_root
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    (root / "m.bin").write_bytes(b"mirror")
    sha = hashlib.sha256(b"mirror").hexdigest()
    assert download([url + "missing.bin", url + "m.bin"], "m.bin", sha).read_bytes() == b"mirror"
    with pytest.raises(ImgclsError, match="IMGCLS_DATA_DIR"):
        download("http://127.0.0.1:9/x.npz", "x.npz", sha, offline_hint="set IMGCLS_DATA_DIR", timeout=2)


def test_named_dataset_uses_local_copy(tmp_path, monkeypatch, tiny_npz):
    monkeypatch.setenv("IMGCLS_DATA_DIR", str(tmp_path))
    tiny_npz.rename(tmp_path / "mnist.npz")
    d = load_data("mnist", val_split=0.0)
    assert d.name == "mnist" and len(d.train) == 120 and d.kind == "digits"


def test_cifar10_binary_archive_parser(tmp_path):
    rng = np.random.default_rng(0)
    def batch(n):
        rec = rng.integers(0, 256, size=(n, 3073), dtype=np.uint8)
        rec[:, 0] = rng.integers(0, 10, n)
        return rec
    recs = {f"cifar-10-batches-bin/data_batch_{i}.bin": batch(3) for i in range(1, 6)}
    recs["cifar-10-batches-bin/test_batch.bin"] = batch(4)
    path = tmp_path / "c.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, rec in recs.items():
            info = tarfile.TarInfo(name)
            info.size = rec.nbytes
            tar.addfile(info, io.BytesIO(rec.tobytes()))
    d = cifar10_from_binary_tar(path)
    assert d.train.images.shape == (15, 3, 32, 32) and d.test.images.shape == (4, 3, 32, 32)
    first = recs["cifar-10-batches-bin/data_batch_1.bin"][0]
    assert d.train.labels[0] == first[0]
    assert torch.equal(d.train.images[0].flatten(), torch.from_numpy(first[1:].copy()))


# ----------------------------------------------------------------------------- shared data
@pytest.mark.shared_data
def test_shared_mnist_npz(shared_data):
    d = load_data(shared_data / "mnist.npz", val_split=0.1)
    assert d.classes == [str(i) for i in range(10)]
    assert len(d.train) + len(d.val) == 60000 and len(d.test) == 10000


@pytest.mark.shared_data
def test_shared_hymenoptera_folder(shared_data):
    d = load_data(shared_data / "hymenoptera")
    assert d.classes == ["ants", "bees"] and len(d.val) == 153
    assert any(p.name == "ant photos.jpg" for p in d.train.paths)
