"""Shared fixtures: small generated data sets, so the core suite needs no download."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# IMGCLS_SHARED_DATA lets a git worktree elsewhere use the same data
SHARED = Path(os.environ.get("IMGCLS_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(autouse=True, scope="session")
def _decode_cache(tmp_path_factory):
    """Decoded-image caches of test runs go to a temporary folder, not ~/.cache."""
    if "IMGCLS_DECODE_CACHE_DIR" not in os.environ:
        os.environ["IMGCLS_DECODE_CACHE_DIR"] = str(tmp_path_factory.mktemp("decoded"))


@pytest.fixture(autouse=True)
def _restore_determinism():
    """--deterministic switches a process-wide torch flag; keep the other tests unaffected."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def pattern_images(n_per_class: int, size: int = 16, channels: int = 1, classes: int = 3, seed: int = 0):
    """Easy, learnable synthetic images: class c = a bright bar at a class-specific place,
    plus noise. Returns uint8 (N, H, W[, C]) and int labels."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(classes):
        for _ in range(n_per_class):
            img = rng.integers(0, 60, size=(size, size)).astype(np.float32)
            band = slice(c * size // classes, (c + 1) * size // classes)
            if c % 2 == 0:
                img[band, :] += 180
            else:
                img[:, band] += 180
            img = np.clip(img, 0, 255).astype(np.uint8)
            if channels == 3:
                img = np.stack([img, np.roll(img, 1, 0), img[::-1]], -1)
            xs.append(img)
            ys.append(c)
    return np.stack(xs), np.array(ys, dtype=np.int64)


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    x, y = pattern_images(40, size=16)
    xt, yt = pattern_images(10, size=16, seed=1)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt, class_names=np.array(["a", "b", "c"]))
    return path


def write_folder(root: Path, n_per_class: int = 12, size: int = 20, splits: tuple[str, ...] = ()) -> Path:
    names = ["cat", "dog", "fox"]
    for s_i, split in enumerate(splits or ("",)):
        x, y = pattern_images(n_per_class, size=size, channels=3, seed=s_i)
        for i, (img, label) in enumerate(zip(x, y)):
            d = root / split / names[label] if split else root / names[label]
            d.mkdir(parents=True, exist_ok=True)
            ext = ".png" if i % 2 else ".jpg"
            Image.fromarray(img).save(d / f"{i}{ext}", quality=95)
    return root


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "photos")


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "splits", n_per_class=8, splits=("train", "val", "test"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One small trained run folder, reused by the CLI and round-trip tests."""
    from imgcls import train

    root = tmp_path_factory.mktemp("trained")
    x, y = pattern_images(40, size=16)
    xt, yt = pattern_images(10, size=16, seed=1)
    npz = root / "tiny.npz"
    np.savez(npz, x_train=x, y_train=y, x_test=xt, y_test=yt, class_names=np.array(["a", "b", "c"]))
    result = train({"data": str(npz), "epochs": 4, "batch_size": 16, "out": str(root / "runs"), "seed": 0},
                   progress=False)
    return result.run_dir


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """A reference CNN trained for 2 epochs on the embedded 8x8 `digits` set (shown at
    28x28): real enough for explanations and calibration to mean something, ~10 s on CPU."""
    from imgcls import train

    root = tmp_path_factory.mktemp("digits")
    result = train({"data": "digits", "epochs": 2, "batch_size": 64, "out": str(root), "name": "run", "seed": 0},
                   progress=False)
    return result.run_dir


@pytest.fixture(scope="module")
def samples() -> list[tuple[bytes, int]]:
    """Uploads for the web-service tests (tests/serving.py)."""
    from tests.serving import make_samples

    return make_samples()


@pytest.fixture(scope="module")
def client(trained_run):
    """The web service of ``trained_run`` in process (torch backend, small upload limit)."""
    pytest.importorskip("fastapi")
    from imgcls.serve.app import ServeSettings, create_app
    from tests.serving import local_client

    app = create_app(trained_run, ServeSettings(max_upload_mb=0.5, backend="torch", max_wait_ms=2))
    with local_client(app) as c:
        yield c
