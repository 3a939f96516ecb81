"""Registered data sets, by name: ``digits`` (embedded), ``mnist``, ``fashion-mnist``,
``cifar10`` (downloaded on first use, verified by sha256, cached).

``IMGCLS_DATA_DIR`` points at local copies: ``mnist.npz``, ``fashion-mnist.npz`` or
``cifar10.npz`` (Keras layout) in that folder are used instead of downloading.
"""

from __future__ import annotations

import gzip
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imgcls.data.download import download
from imgcls.data.records import ImageData, Split
from imgcls.data.split import stratified_split
from imgcls.registry import Registry

DATASETS: Registry = Registry("dataset")

_KERAS = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
_ZALANDO = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def _offline_hint(local_name: str) -> str:
    return (f"offline? put {local_name} in a folder and set IMGCLS_DATA_DIR to it, "
            f"or pass the file itself with --data path/to/{local_name}")


def _local_copy(filename: str) -> Path | None:
    root = os.environ.get("IMGCLS_DATA_DIR")
    if root and (Path(root) / filename).is_file():
        return Path(root) / filename
    return None


def _from_local_npz(path: Path, name: str, classes: list[str] | None, kind: str) -> ImageData:
    from imgcls.data.sources import from_npz  # sources imports this module

    data = from_npz(path, class_names=classes)
    data.name, data.kind = name, kind
    return data


@DATASETS.register("digits")
def digits() -> ImageData:
    """scikit-learn's 1,797 embedded 8x8 handwritten digits, upscaled to 28x28 uint8.

    There is no official test split: a fixed stratified 20% (seed 0, independent of the
    training seed) is the test set, so every run reports on the same images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N,1,8,8) in [0,1]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.from_numpy(d.target).long()
    train_idx, test_idx = stratified_split(y, 0.2, seed=0)
    return ImageData(
        classes=[str(i) for i in range(10)],
        train=Split(labels=y[train_idx], images=x[train_idx]),
        test=Split(labels=y[test_idx], images=x[test_idx]),
        name="digits", channels=1, native_size=28, kind="digits",
    )


@DATASETS.register("mnist")
def mnist() -> ImageData:
    local = _local_copy("mnist.npz")
    path = local or download(_KERAS + "mnist.npz", "mnist.npz", MNIST_SHA256, offline_hint=_offline_hint("mnist.npz"))
    return _from_local_npz(path, "mnist", [str(i) for i in range(10)], "digits")


def _read_idx(raw: bytes) -> np.ndarray:
    """Parse an IDX file (the MNIST format): magic, dims, then big-endian uint8 data."""
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError("not a uint8 IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


_FASHION_FILES = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}


@DATASETS.register("fashion-mnist")
def fashion_mnist() -> ImageData:
    local = _local_copy("fashion-mnist.npz")
    if local:
        return _from_local_npz(local, "fashion-mnist", FASHION_CLASSES, "digits")
    arrays = {}
    for fname, sha in _FASHION_FILES.items():
        path = download([_KERAS + fname, _ZALANDO + fname], f"fashion-mnist/{fname}", sha,
                        offline_hint=_offline_hint("fashion-mnist.npz"))
        arrays[fname.split("-")[0] + "-" + fname.split("-")[1]] = _read_idx(gzip.decompress(path.read_bytes()))
    xtr, ytr = arrays["train-images"], arrays["train-labels"]
    xte, yte = arrays["t10k-images"], arrays["t10k-labels"]
    return ImageData(
        classes=FASHION_CLASSES,
        train=Split(labels=torch.from_numpy(ytr.astype(np.int64)), images=torch.from_numpy(xtr.copy()).unsqueeze(1)),
        test=Split(labels=torch.from_numpy(yte.astype(np.int64)), images=torch.from_numpy(xte.copy()).unsqueeze(1)),
        name="fashion-mnist", channels=1, native_size=28, kind="digits",
    )


@DATASETS.register("cifar10")
def cifar10() -> ImageData:
    """CIFAR-10 from the binary archive (not the Python pickles: nothing is unpickled)."""
    local = _local_copy("cifar10.npz")
    if local:
        return _from_local_npz(local, "cifar10", CIFAR10_CLASSES, "small-colour")
    path = download(CIFAR10_URL, "cifar-10-binary.tar.gz", CIFAR10_SHA256, offline_hint=_offline_hint("cifar10.npz"))
    return cifar10_from_binary_tar(path)


def cifar10_from_binary_tar(path: Path) -> ImageData:
    def read(members: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        rec = np.frombuffer(b"".join(members), np.uint8).reshape(-1, 3073)  # label + 3x32x32
        return (torch.from_numpy(rec[:, 1:].reshape(-1, 3, 32, 32).copy()),
                torch.from_numpy(rec[:, 0].astype(np.int64)))

    train, test = [], []
    with tarfile.open(path, "r:gz") as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            base = os.path.basename(m.name)
            if base.startswith("data_batch_") and base.endswith(".bin"):
                train.append(tar.extractfile(m).read())
            elif base == "test_batch.bin":
                test.append(tar.extractfile(m).read())
    (xtr, ytr), (xte, yte) = read(train), read(test)
    return ImageData(classes=CIFAR10_CLASSES, train=Split(labels=ytr, images=xtr),
                     test=Split(labels=yte, images=xte), name="cifar10", channels=3,
                     native_size=32, kind="small-colour")


