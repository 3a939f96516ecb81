"""Every named data set's download path, against a local HTTP server on 127.0.0.1: small
generated files in the real formats (Keras .npz, gzipped IDX, CIFAR-10's binary tar),
the real download code (checksum, cache, fallback URL), and the offline error."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import socket
import tarfile
import threading

import numpy as np
import pytest

from imgcls.data import datasets
from imgcls.errors import ImgclsError


def idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX format (MNIST's): magic 0x0000 08 ndim, big-endian dims, uint8 data."""
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def cifar_tar(batches: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, rec in batches.items():
            data = rec.tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server():
    """Serves ``files`` (path -> bytes) on 127.0.0.1; counts requests per path."""
    files: dict[str, bytes] = {}
    hits: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", files, hits
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("IMGCLS_DATA_DIR", raising=False)


def test_mnist_downloads_verifies_and_caches(server, monkeypatch):
    base, files, hits = server
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), np.arange(20) % 10
    xt, yt = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), np.arange(10) % 10
    buf = io.BytesIO()
    np.savez(buf, x_train=x, y_train=y, x_test=xt, y_test=yt)
    files["/keras/mnist.npz"] = buf.getvalue()
    monkeypatch.setattr(datasets, "_KERAS", base + "/keras/")
    monkeypatch.setattr(datasets, "MNIST_SHA256", sha(buf.getvalue()))
    data = datasets.DATASETS.get("mnist")()
    assert data.name == "mnist" and data.classes == [str(i) for i in range(10)]
    assert np.array_equal(data.train.images[:, 0].numpy(), x) and data.test.labels.tolist() == yt.tolist()
    again = datasets.DATASETS.get("mnist")()  # from the cache: no second request
    assert hits["/keras/mnist.npz"] == 1 and np.array_equal(again.test.images[:, 0].numpy(), xt)


def test_fashion_mnist_downloads_into_its_subfolder_with_the_fallback_url(server, monkeypatch, tmp_path):
    base, files, hits = server
    rng = np.random.default_rng(1)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte.gz": (np.arange(12) % 10).astype(np.uint8),
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte.gz": (np.arange(5) % 10).astype(np.uint8)}
    checksums = {}
    for name, arr in arrays.items():
        body = gzip.compress(idx_bytes(arr))
        files[f"/zalando/{name}"] = body  # only on the second URL: the first answers 404
        checksums[name] = sha(body)
    monkeypatch.setattr(datasets, "_KERAS", base + "/keras/")
    monkeypatch.setattr(datasets, "_ZALANDO", base + "/zalando/")
    monkeypatch.setattr(datasets, "_FASHION_FILES", checksums)
    data = datasets.DATASETS.get("fashion-mnist")()
    assert data.classes == datasets.FASHION_CLASSES and data.train.images.shape == (12, 1, 28, 28)
    assert np.array_equal(data.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte.gz"])
    assert data.test.labels.tolist() == [0, 1, 2, 3, 4]
    assert (tmp_path / "cache" / "datasets" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").is_file()
    assert hits["/keras/train-images-idx3-ubyte.gz"] == 1 and hits["/zalando/train-images-idx3-ubyte.gz"] == 1
    datasets.DATASETS.get("fashion-mnist")()
    assert hits["/zalando/train-images-idx3-ubyte.gz"] == 1  # cached


def test_cifar10_downloads_the_binary_archive(server, monkeypatch):
    base, files, _ = server
    rng = np.random.default_rng(2)
    batches = {}
    for name, n in [(f"data_batch_{i}.bin", 3) for i in range(1, 6)] + [("test_batch.bin", 4)]:
        rec = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
        rec[:, 0] = np.arange(n) % 10
        batches[name] = rec
    body = cifar_tar(batches)
    files["/cifar-10-binary.tar.gz"] = body
    monkeypatch.setattr(datasets, "CIFAR10_URL", base + "/cifar-10-binary.tar.gz")
    monkeypatch.setattr(datasets, "CIFAR10_SHA256", sha(body))
    data = datasets.DATASETS.get("cifar10")()
    train = np.concatenate([batches[f"data_batch_{i}.bin"] for i in range(1, 6)])
    assert data.train.images.shape == (15, 3, 32, 32) and data.test.images.shape == (4, 3, 32, 32)
    assert np.array_equal(data.train.images.reshape(15, -1).numpy(), train[:, 1:])
    assert data.test.labels.tolist() == [0, 1, 2, 3] and data.classes == datasets.CIFAR10_CLASSES


def test_checksum_mismatch_is_refused_and_nothing_is_kept(server, monkeypatch, tmp_path):
    base, files, _ = server
    files["/keras/mnist.npz"] = b"not the real file"
    monkeypatch.setattr(datasets, "_KERAS", base + "/keras/")
    with pytest.raises(ImgclsError, match=r"could not download mnist.npz .*checksum mismatch.*IMGCLS_DATA_DIR"):
        datasets.DATASETS.get("mnist")()
    left = list((tmp_path / "cache" / "datasets").iterdir())
    assert left == []  # no partial or unverified file poses as a good one


def test_no_network_names_the_offline_alternative(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nothing listens on: connection refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(datasets, "CIFAR10_URL", f"http://127.0.0.1:{port}/cifar-10-binary.tar.gz")
    with pytest.raises(ImgclsError) as err:
        datasets.DATASETS.get("cifar10")()
    text = str(err.value)
    assert "could not download cifar-10-binary.tar.gz" in text and "IMGCLS_DATA_DIR" in text
    assert "\n" not in text
    # the offline alternative works: a local copy in IMGCLS_DATA_DIR, no network
    x = np.zeros((4, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "cifar10.npz", x_train=x, y_train=np.arange(4), x_test=x[:2], y_test=np.arange(2))
    monkeypatch.setenv("IMGCLS_DATA_DIR", str(tmp_path))
    local = datasets.DATASETS.get("cifar10")()
    assert local.name == "cifar10" and len(local.train) == 4 and local.classes == datasets.CIFAR10_CLASSES
