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


# ----------------------------------------------------------------------------- review fixes
def _png_tree(root, layout: dict[str, int], size: int = 8, seed: int = 0):
    """``{"train/cat": 3, ...}``: that many small random PNGs in each folder."""
    rng = np.random.default_rng(seed)
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / folder / f"{i}.png")
    return root


def test_training_and_testing_folders_are_split_folders(tmp_path):
    root = _png_tree(tmp_path / "tt", {"Training/cat": 3, "Training/dog": 3, "Testing/cat": 2, "Testing/dog": 2})
    d = from_folder(root)
    assert d.classes == ["cat", "dog"]
    assert len(d.train) == 6 and len(d.test) == 4


def test_split_like_folders_under_other_names_are_refused(tmp_path):
    root = _png_tree(tmp_path / "kg", {"Train_set/cat": 2, "Train_set/dog": 2, "Test_set/cat": 2, "Test_set/dog": 2})
    with pytest.raises(ImgclsError, match=r"Test_set.*Train_set.*look like split folders: name them train/, val/"):
        from_folder(root)
    folds = _png_tree(tmp_path / "cv", {"fold1/cat": 2, "fold1/dog": 2, "fold2/cat": 2, "fold2/dog": 2})
    with pytest.raises(ImgclsError, match=r"fold1/, fold2/ hold the same class folders"):
        from_folder(folds)  # was a 2-class set "fold1" vs "fold2"
    # the same layout under names that are no split's: class folders organised by year
    years = _png_tree(tmp_path / "yr", {"cat/2019": 2, "cat/2020": 1, "dog/2019": 2, "dog/2020": 2})
    d = from_folder(years)
    assert d.classes == ["cat", "dog"] and d.train.class_counts(2) == [3, 4]


def test_a_class_folder_named_train_is_a_class(tmp_path):
    root = _png_tree(tmp_path / "veh", {"bus": 2, "car": 2, "train": 2})
    d = load_data(root, val_split=0)
    assert d.classes == ["bus", "car", "train"] and d.train.class_counts(3) == [2, 2, 2]


def test_npz_uint16_is_scaled_and_standardised_or_signed_pixels_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    x8 = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    y = np.arange(6) % 2
    p = tmp_path / "u16.npz"
    np.savez(p, x_train=x8.astype(np.uint16) * 257, y_train=y)
    assert torch.equal(from_npz(p).train.images[:, 0], torch.from_numpy(x8))  # as a 16-bit PNG maps: v / 257
    np.savez(p, x_train=x8.astype(np.float32) / 255, y_train=y)
    assert torch.equal(from_npz(p).train.images[:, 0], torch.from_numpy(x8))  # floats in 0..1: as before
    bad = {"std": (x8 - x8.mean()) / x8.std(), "big": x8.astype(np.float32) * 4,
           "i16": x8.astype(np.int16) * 128 - 16384}
    for name, x in bad.items():
        np.savez(tmp_path / f"{name}.npz", x_train=x, y_train=y)
        with pytest.raises(ImgclsError, match=rf"{name}.npz.*x_train.*{x.dtype}.*store raw pixels: uint8, uint16"):
            from_npz(tmp_path / f"{name}.npz")


def test_held_out_val_at_evaluation_is_the_one_training_held_out_with_reordered_classes(tmp_path):
    from imgcls.data.pipeline import evaluation_data

    root = _png_tree(tmp_path / "ds", {"cat": 12, "dog": 12})
    trained = load_data(root, val_split=0.25, seed=0, classes=["dog", "cat"])
    data, name, attr = evaluation_data(root, "val", 0.25, 0, classes=["dog", "cat"])
    assert name == "val" and {str(p) for p in data.val.paths} == {str(p) for p in trained.val.paths}
    assert not {str(p) for p in data.val.paths} & {str(p) for p in trained.train.paths}
    default = load_data(root, val_split=0.25, seed=0)  # runs without --classes keep today's split
    again, _, _ = evaluation_data(root, "val", 0.25, 0, classes=["cat", "dog"])
    assert [str(p) for p in again.val.paths] == [str(p) for p in default.val.paths]


def test_numbered_labels_map_by_name_to_a_model_with_numbered_classes():
    from imgcls.data.sources import from_arrays, with_classes

    y = np.arange(12)
    data = from_arrays(np.zeros((12, 8, 8), np.uint8), y)
    model = sorted(str(i) for i in range(12))  # folders 0..11, sorted as strings: 0, 1, 10, 11, 2, ...
    mapped = with_classes(data, model)
    assert [model[i] for i in mapped.train.labels.tolist()] == [str(i) for i in range(12)]
    named = with_classes(data, [f"c{i}" for i in range(12)])  # no shared names: by position, as before
    assert named.train.labels.tolist() == list(range(12))


def test_manifest_written_on_windows_finds_its_files(tmp_path):
    from imgcls.data.manifest import from_manifest

    root = _png_tree(tmp_path / "ds1", {"cat": 2, "dog": 2})
    (tmp_path / "man").mkdir()
    m = tmp_path / "man" / "win.csv"
    m.write_text("path,label\n" + "".join(f"..\\ds1\\{c}\\{i}.png,{c}\n" for c in ("cat", "dog") for i in range(2)))
    d = from_manifest(m)
    assert all(p.is_file() for p in d.train.paths) and d.train.paths[0] == m.parent / "../ds1/cat/0.png"
    m.write_text("path,label\nC:\\data\\cat\\0.png,cat\nC:\\data\\dog\\0.png,dog\n")
    with pytest.raises(ImgclsError, match=r"win.csv line 2: 'C:\\data\\cat\\0.png' is a Windows drive path"):
        from_manifest(m)
    assert root.is_dir()


@pytest.mark.parametrize("header", ["file_name,label", "image_id,label", "img,class"])
def test_manifest_header_with_an_unknown_path_column_name_is_a_header(tmp_path, header):
    from imgcls.data.manifest import from_manifest

    _png_tree(tmp_path, {"cat": 2, "dog": 2})
    m = tmp_path / "m.csv"
    m.write_text(header + "\n" + "".join(f"{c}/{i}.png,{c}\n" for c in ("cat", "dog") for i in range(2)))
    d = from_manifest(m)
    assert d.classes == ["cat", "dog"] and len(d.train) == 4


def test_evaluate_split_val_of_a_run_with_reordered_classes_scores_its_held_out_images(tmp_path):
    """End to end: a run trained with ``--classes dog,cat`` and evaluated with ``--split val``
    is scored on the images its training held out, not on images it trained on."""
    from imgcls import Classifier, train

    root = _png_tree(tmp_path / "ds", {"cat": 12, "dog": 12}, size=16)
    result = train({"data": str(root), "classes": ["dog", "cat"], "val_split": 0.25, "epochs": 1,
                    "img_size": 16, "out": str(tmp_path / "runs"), "name": "r"})
    held_out = {str(p) for p in load_data(root, val_split=0.25, seed=0, classes=["dog", "cat"]).val.paths}
    data, name, part, _ = Classifier.load(result.run_dir).eval_data(str(root), "val", announce=False)
    assert name == "val" and len(part) == len(held_out) == 6
    assert {str(p) for p in data.val.paths} == held_out


def test_a_folder_beside_the_split_folders_is_said_to_be_unread(tmp_path, capsys):
    """train/ + Holdout/: the images under Holdout/ are not read - reported by the data, by
    audit and at training, not dropped in silence."""
    from imgcls.cli import main
    from imgcls.data.sources import UNUSED_FOLDER

    root = _png_tree(tmp_path / "ds", {"train/cat": 4, "train/dog": 4, "Holdout/cat": 2, "Holdout/dog": 2})
    d = from_folder(root)
    assert d.val is None and d.test is None
    assert [(str(p), why) for _, p, why in d.passed_over] == [(str(root / "Holdout"), UNUSED_FOLDER)]
    main(["audit", str(root)])
    assert f"not read: {root / 'Holdout'} (name it val/ or test/ to use it)" in capsys.readouterr().out
    assert from_folder(_png_tree(tmp_path / "plain", {"cat": 2, "dog": 2})).passed_over == []
    from imgcls import train

    train({"data": str(root), "epochs": 1, "img_size": 16, "out": str(tmp_path / "runs")}, progress=False)
    assert f"imgcls: not read: {root / 'Holdout'} (name it val/ or test/ to use it)" in capsys.readouterr().err
