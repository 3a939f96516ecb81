"""Shard sets (imgcls shard) and streamed training / evaluation from them."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from imgcls.cli import main
from imgcls.data.shard_writer import parse_size, write_shards
from imgcls.data.shardset import assign, from_shards, is_shard_spec
from imgcls.data.sources import load_data
from imgcls.data.streaming import BytesDecoder, StreamBatches
from imgcls.errors import ImgclsError

from .conftest import pattern_images, write_folder

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]


def _indexed_npz(path: Path, n: int, size: int = 8) -> Path:
    """Grayscale images whose first two pixels spell their index (PNG in shards: lossless)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(n, size, size)).astype(np.uint8)
    idx = np.arange(n)
    x[:, 0, 0], x[:, 0, 1] = idx // 256, idx % 256
    np.savez(path, x_train=x, y_train=idx % 3, class_names=np.array(["a", "b", "c"]))
    return path


def _ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist()


RAW = BytesDecoder(v2.Compose([v2.PILToTensor()]), 1)  # the member's pixels exactly


def _shards(tmp_path: Path, n: int, shard_size: str, fmt: str = "webdataset") -> Path:
    data = load_data(_indexed_npz(tmp_path / "ix.npz", n), val_split=0.0)
    write_shards(data, tmp_path / "sh", fmt=fmt, shard_size=parse_size(shard_size))
    return tmp_path / "sh"


# ---------------------------------------------------------------------- writing
def test_shard_cli_writes_shards_and_an_index_with_counts_and_checksums(tiny_npz, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["shard", str(tiny_npz), "--out", str(out), "--shard-size", "4KB"]) == 0
    assert "wrote" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "webdataset" and index["classes"] == ["a", "b", "c"]
    assert set(index["splits"]) == {"train", "val", "test"}  # val held out (stratified), as training would
    assert index["splits"]["train"]["count"] + index["splits"]["val"]["count"] == 120
    assert sum(index["splits"]["train"]["class_counts"]) == index["splits"]["train"]["count"]
    for part in index["splits"].values():
        assert sum(s["count"] for s in part["shards"]) == part["count"]
        for s in part["shards"]:
            assert hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert len(index["splits"]["train"]["shards"]) > 1
    assert main(["shard", str(tiny_npz), "--out", str(out)]) == 1  # refuses to overwrite unasked
    assert "--overwrite" in capsys.readouterr().err
    assert main(["shard", str(tiny_npz), "--out", str(tmp_path / "x"), "--shard-size", "lots"]) == 1
    assert "--shard-size lots" in capsys.readouterr().err


def test_shard_out_that_is_a_file_is_one_line(tiny_npz, tmp_path, capsys):
    """--out naming an existing file (or a path under one) was an internal NotADirectoryError."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for out in (afile, afile / "sub"):
        assert main(["shard", str(tiny_npz), "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip()
        assert f"--out {out}: {afile} is a file, not a folder" in err and "\n" not in err
    assert afile.read_text() == "not a folder"


def test_parse_size():
    assert parse_size("512MB") == 512 * 10**6 and parse_size("64MiB") == 64 * 2**20 and parse_size("1.5gb") == 1.5e9


@pytest.mark.parametrize("encoding", ["encoded", "raw"])
def test_folder_with_resize_and_an_unreadable_file(tmp_path, capsys, encoding):
    root = write_folder(tmp_path / "photos", n_per_class=6, size=40)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    index = write_shards(load_data(root), tmp_path / "sh", resize=24, encoding=encoding if encoding == "encoded"
                         else None)  # --resize alone writes raw pixels
    assert [s["path"] for s in index["skipped"]] == [str(root / "cat" / "broken.jpg")]
    assert "skipped 1 unreadable" in capsys.readouterr().err
    data = from_shards(tmp_path / "sh")
    assert data.kind == "photos" and len(data.train) + len(data.val) == 18
    with tarfile.open(tmp_path / "sh" / "train-000000.tar") as t:
        from PIL import Image
        if encoding == "encoded":
            img = Image.open(io.BytesIO(t.extractfile(next(m for m in t if m.name.endswith(".jpg"))).read()))
            assert min(img.size) == 24  # re-encoded with the shorter side at 24
        else:  # the decode cache's row for the file: shorter side 24, centre square, (H, W, C) uint8
            from imgcls.data.cache import CacheSpec

            m = next(m for m in t if m.name.endswith(".npy"))
            row = np.load(io.BytesIO(t.extractfile(m).read()))
            path = json.loads(t.extractfile(m.name.replace(".npy", ".json")).read())["path"]
            want = CacheSpec(side=24, channels=3).decode(Path(path)).permute(1, 2, 0).numpy()
            assert row.dtype == np.uint8 and np.array_equal(row, want)
    assert index["encoding"] == encoding and (index.get("raw_shape") == [24, 24, 3]) == (encoding == "raw")


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_both_formats_stream_every_sample(tmp_path, fmt):
    sh = _shards(tmp_path, 50, "2KB", fmt)
    data = from_shards(sh)
    assert data.train.streamed and len(data.train) == 50 and data.native_size == 8
    b = StreamBatches(data.train, 7, RAW, workers=0)
    assert sorted(i for x, _ in b for i in _ids(x)) == list(range(50))


# ---------------------------------------------------------------------- who reads what
@pytest.mark.parametrize("n, shard_size", [(203, "3KB"), (203, "40KB"), (37, "1MB")])  # many, few, one shard
def test_two_ranks_two_workers_read_every_sample_once_in_equal_steps(tmp_path, n, shard_size):
    split = from_shards(_shards(tmp_path, n, shard_size)).train
    orders = []
    for epoch in (1, 2):
        seen, steps = [], []
        for rank in range(2):
            b = StreamBatches(split, 8, RAW, shuffle=True, seed=1, shuffle_buffer=16, workers=2)
            b.shard(rank, 2, even=True)
            b.set_epoch(epoch)
            batches = list(b)
            assert len(batches) == len(b)  # the step count announced before the epoch
            steps.append(len(batches))
            seen += [i for x, _ in batches[:len(batches) - b.padded] for i in _ids(x)]
        assert steps[0] == steps[1]  # DDP: no rank waits for another that ran out of data
        assert sorted(seen) == list(range(n))  # every sample exactly once across ranks and workers
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled each epoch


def test_assignment_is_a_partition_and_the_same_everywhere():
    from imgcls.data.shardset import ShardInfo

    shards = [ShardInfo(f"s{i}", f"s{i}", c) for i, c in enumerate([10, 10, 10, 3])]
    a = assign(shards, world=3, workers=2, seed=0, epoch=4, shuffle=True)
    assert a == assign(shards, world=3, workers=2, seed=0, epoch=4, shuffle=True)
    units = [u for rank in a for worker in rank for u in worker]
    covered = sorted((u.shard, p) for u in units for p in range(shards[u.shard].count) if p % u.parts == u.part)
    assert covered == sorted((i, p) for i, s in enumerate(shards) for p in range(s.count))


def test_eval_share_is_unpadded(tmp_path):
    split = from_shards(_shards(tmp_path, 60, "2KB")).train
    seen = []
    for rank in range(2):
        b = StreamBatches(split, 8, RAW, workers=1)
        b.shard(rank, 2, even=False)
        seen += [i for x, _ in b for i in _ids(x)]
    assert sorted(seen) == list(range(60))


# ---------------------------------------------------------------------- bad shards
def _rewrite_member(path: Path, fix) -> None:
    """Rewrite a tar shard with ``fix(name, bytes) -> bytes`` applied to each member."""
    with tarfile.open(path) as t:
        members = [(m, t.extractfile(m).read()) for m in t if m.isreg()]
    with tarfile.open(path, "w") as t:
        for m, data in members:
            data = fix(m.name, data)
            m.size = len(data)
            t.addfile(m, io.BytesIO(data))


def _reindex(sh: Path) -> None:
    index = json.loads((sh / "index.json").read_text())
    for part in index["splits"].values():
        for s in part["shards"]:
            if (sh / s["name"]).exists():
                s["sha256"] = hashlib.sha256((sh / s["name"]).read_bytes()).hexdigest()
    (sh / "index.json").write_text(json.dumps(index))


def _read_all(sh: Path, strict: bool, workers: int = 1):
    b = StreamBatches(from_shards(sh).train, 8, RAW, workers=workers, strict=strict)
    return b, sorted(i for x, _ in b for i in _ids(x))


def test_corrupt_member_is_named_and_skipped_or_refused(tmp_path, capsys):
    sh = _shards(tmp_path, 40, "2KB")
    first = sorted(sh.glob("train-*.tar"))[1]
    victim = []

    def corrupt(name, data):
        if name.endswith(".png") and not victim:
            victim.append(name)
            return data[:len(data) // 2]  # a truncated PNG
        return data

    _rewrite_member(first, corrupt)
    _reindex(sh)
    b, ids = _read_all(sh, strict=False)
    assert len(ids) == 39 and len(b.problems) == 1
    assert f"{first.name}:{victim[0]}" in b.problems[0] and "truncated or corrupt" in b.problems[0]
    assert victim[0] in capsys.readouterr().err
    with pytest.raises(ImgclsError, match=first.name):
        _read_all(sh, strict=True)


@pytest.mark.parametrize("damage", ["truncated", "missing", "checksum"])
def test_bad_shards_are_reported_never_hang(tmp_path, damage):
    sh = _shards(tmp_path, 60, "2KB")
    shard = sorted(sh.glob("train-*.tar"))[2]
    count = next(s["count"] for s in json.loads((sh / "index.json").read_text())["splits"]["train"]["shards"]
                 if s["name"] == shard.name)
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:1800])
    elif damage == "missing":
        shard.unlink()
    else:
        _rewrite_member(shard, lambda name, data: data)  # same samples, other bytes (tar headers)
        shard.write_bytes(shard.read_bytes() + b"\0" * 512)
    b, ids = _read_all(sh, strict=False, workers=2)
    assert len(b.problems) == 1 and shard.name in b.problems[0]
    assert {"truncated": "truncated or corrupt tar", "missing": "missing",
            "checksum": "sha256 mismatch"}[damage] in b.problems[0]
    lost = {"truncated": count - len(ids) + 60 - count, "missing": count, "checksum": 0}[damage]
    assert len(ids) == 60 - lost if damage != "truncated" else 60 - count <= len(ids) < 60
    with pytest.raises(ImgclsError, match=shard.name):
        _read_all(sh, strict=True)


def test_strict_training_refuses_a_missing_shard(tmp_path, capsys):
    sh = _shards(tmp_path, 60, "2KB")
    sorted(sh.glob("train-*.tar"))[0].unlink()
    args = ["train", "--data", str(sh), "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path / "runs"),
            "--workers", "1", "--img-size", "16"]
    assert main([*args, "--strict"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # the recipe line comes before it
    assert len(errors) == 1 and "train-000000.tar: missing" in errors[0] and "Traceback" not in err


# ---------------------------------------------------------------------- naming and opening shard sets
@pytest.fixture
def http_root(tmp_path):
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_is_streamed_without_range_requests():
    from imgcls.data.shardset import storage_options

    assert storage_options("http://127.0.0.1:8000/x.tar")["block_size"] == 0  # plain servers answer no ranges
    assert storage_options("/data/x.tar") == {}


def test_an_evaluation_stream_is_never_padded(tmp_path):
    sh = _shards(tmp_path, 60, "2KB")
    sorted(sh.glob("train-*.tar"))[0].unlink()
    b = StreamBatches(from_shards(sh).train, 8, RAW, workers=2)  # as eval_batches builds it
    assert sum(len(y) for _, y in b) < 60 and b.padded == 0


def test_http_url_and_brace_pattern(http_root):
    root, url = http_root
    sh = _shards(root, 40, "2KB")
    names = sorted(p.name for p in sh.glob("train-*.tar"))
    for spec in (f"{url}/sh", f"{url}/sh/", f"{url}/sh/index.json"):
        assert is_shard_spec(spec)
        b = StreamBatches(from_shards(spec).train, 8, RAW, workers=1)
        assert sorted(i for x, _ in b for i in _ids(x)) == list(range(40))
    pattern = str(sh / "train-{000000..000001}.tar")
    data = from_shards(pattern)
    assert [s.name for s in data.train.shards.shards] == names[:2]
    assert len(list(StreamBatches(data.train, 1000, RAW, workers=0))[0][1]) == len(data.train)
    with pytest.raises(ImgclsError, match="not in"):
        from_shards(str(sh / "train-{000000..000999}.tar"))
    with pytest.raises(ImgclsError, match="no shard index"):
        from_shards(f"{url}/nothing/")


# ---------------------------------------------------------------------- training and evaluation
def test_training_from_shards_learns_through_the_same_pipeline(tmp_path, tiny_npz):
    from imgcls import Classifier

    write_shards(load_data(tiny_npz), tmp_path / "sh", shard_size=4000)
    clf = Classifier.create("reference_cnn", classes=["a", "b", "c"], in_chans=1, img_size=16, seed=0)
    summary = clf.fit(str(tmp_path / "sh"), epochs=3, batch_size=16, lr=3e-3, workers=2, progress=False)
    assert summary["train_images"] == 108 and summary["val_images"] == 12
    assert clf.evaluate(str(tmp_path / "sh"))["accuracy"] >= 0.9  # its test shards
    # the normalisation statistics are the in-memory data's own
    from imgcls.data.pipeline import data_stats
    assert clf.preprocessing.mean == data_stats(load_data(tiny_npz).train.images, 1)[0]


def test_a_shard_set_without_val_is_noted_once_however_often_it_is_loaded(tmp_path):
    data = load_data(str(_shards(tmp_path, 30, "4000")))  # written with val_split 0: train only
    assert data.val is None
    again = load_data(data)
    note = [n for n in again.notes if "no validation split" in n]
    assert note == ["the shard set has no validation split (`imgcls shard` writes one)"]


def test_photo_shards_train_with_random_resized_crops(tmp_path):
    root = write_folder(tmp_path / "photos", n_per_class=10, size=48, splits=("train", "val"))
    write_shards(load_data(root), tmp_path / "sh", resize=40)
    run = tmp_path / "runs"
    assert main(["train", "--data", str(tmp_path / "sh"), "--epochs", "1", "--img-size", "32", "--batch-size", "8",
                 "--out", str(run), "--name", "r", "--workers", "1", "--shuffle-buffer", "50"]) == 0
    card = json.loads((run / "r" / "model.json").read_text())
    assert card["training"]["augment"]["preset"] == "photo" and card["preprocessing"]["resize"] == "shorter_side"


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_torchrun_two_processes_train_from_uneven_shards(tmp_path):
    x, y = pattern_images(50, size=16)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, class_names=np.array(["a", "b", "c"]))
    write_shards(load_data(tmp_path / "d.npz"), tmp_path / "sh", shard_size=9000)  # 5 uneven shards
    proc = subprocess.run([PY, "-m", "imgcls", "train", "--data", str(tmp_path / "sh"), "--devices", "2",
                           "--epochs", "2", "--batch-size", "16", "--out", str(tmp_path / "runs"), "--name", "r",
                           "--workers", "1", "--device", "cpu"], env=_env(), capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((tmp_path / "runs" / "r" / "model.json").read_text())
    assert card["training"]["distributed"]["processes"] == 2
    assert card["metrics"]["best_val"]["val_acc"] >= 0.8


@pytest.mark.slow
@pytest.mark.shared_data
def test_hymenoptera_shards_hold_every_image(shared_data, tmp_path):
    write_shards(load_data(shared_data / "hymenoptera"), tmp_path / "sh", shard_size=parse_size("4MB"), resize=160)
    data = from_shards(tmp_path / "sh")
    folder = load_data(shared_data / "hymenoptera")
    assert (len(data.train), len(data.val)) == (len(folder.train), len(folder.val))
    assert data.train.class_counts(2) == folder.train.class_counts(2)
    b = StreamBatches(data.val, 64, RAW.__class__(v2.Compose([v2.PILToTensor(), v2.CenterCrop(64)]), 3), workers=2)
    assert sum(len(y) for _, y in b) == len(folder.val) and not b.problems


# ---------------------------------------------------------------------- batch prediction in parts
@pytest.fixture
def saved_model(tmp_path):
    from imgcls import Classifier

    clf = Classifier.create("reference_cnn", classes=["cat", "dog", "fox"], in_chans=3, img_size=16, seed=0)
    clf.save(tmp_path / "model")
    return Classifier.load(tmp_path / "model")


def _rows(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for p in sorted(folder.glob("part-*")):
        rows += pq.read_table(p).to_pylist() if p.suffix == ".parquet" else \
            [json.loads(line) for line in p.read_text().splitlines()]
    return rows


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_prediction_parts_cover_every_image_once_and_finished_parts_are_skipped(saved_model, tmp_path, fmt):
    from imgcls.engine.batch_predict import Ranks

    root = write_folder(tmp_path / "imgs", n_per_class=7, size=20)
    (root / "cat" / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "preds"
    for rank in range(2):
        s = _parts(saved_model, root, out, fmt, Ranks(rank, 2))
        assert not s["skipped"]
    rows = _rows(out)
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    assert sorted(r["source"] for r in rows) == files  # every image once, over both parts
    bad = next(r for r in rows if r["source"].endswith("bad.png"))
    assert bad["error"] and bad["label"] is None
    good = [r for r in rows if not r["error"]]
    assert all(len(r["top_classes"]) == 2 and abs(sum(r["probabilities"]) - 1) < 1e-3 for r in good)
    again = _parts(saved_model, root, out, fmt, Ranks(1, 2))
    assert again["skipped"]  # rerun: the finished part is not redone


def _parts(clf, src, out, fmt, ranks, batch_size=4):
    from imgcls.data.pipeline import prediction_split
    from imgcls.engine.batch_predict import predict_parts

    split, names = prediction_split([src], clf.preprocessing)
    return predict_parts(clf, split, names, out, fmt=fmt, top_k=2, batch_size=batch_size, workers=0,
                         progress=False, ranks=ranks)


def test_a_killed_jsonl_part_continues_after_its_last_complete_row(saved_model, tmp_path):
    from imgcls.engine.batch_predict import Ranks

    root = write_folder(tmp_path / "imgs", n_per_class=5, size=20)
    out = tmp_path / "preds"
    _parts(saved_model, root, out, "jsonl", Ranks(0, 1))
    full = (out / "part-00000-of-00001.jsonl").read_text().splitlines()
    (out / "part-00000-of-00001.jsonl").unlink()
    # as a SIGKILL leaves it: 6 rows flushed, the 7th half written
    (out / "part-00000-of-00001.jsonl.partial").write_text("\n".join(full[:6]) + "\n" + full[6][:20])
    s = _parts(saved_model, root, out, "jsonl", Ranks(0, 1))
    assert s["rows"] == 15 and (out / "part-00000-of-00001.jsonl").read_text().splitlines() == full


def test_prediction_over_a_shard_set_splits_its_shards_over_ranks(saved_model, tmp_path):
    from imgcls.engine.batch_predict import Ranks

    root = write_folder(tmp_path / "imgs", n_per_class=8, size=20, splits=("train", "val"))
    write_shards(load_data(root), tmp_path / "sh", shard_size=3000)
    out = tmp_path / "preds"
    for rank in range(2):
        _parts(saved_model, tmp_path / "sh", out, "parquet", Ranks(rank, 2))
    rows = _rows(out)
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    assert sorted(r["source"] for r in rows) == files


@pytest.mark.slow
def test_predict_devices_2_writes_two_parts(saved_model, tmp_path):
    root = write_folder(tmp_path / "imgs", n_per_class=10, size=20)
    proc = subprocess.run([PY, "-m", "imgcls", "predict", str(tmp_path / "model"), str(root), "--devices", "2",
                           "--output", str(tmp_path / "preds") + "/", "--workers", "1", "--device", "cpu"],
                          env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "preds").glob("part-*-of-00002.parquet"))) == 2
    assert len(_rows(tmp_path / "preds")) == 30


def test_resume_offset_replays_the_epoch_and_drops_trained_batches(tmp_path):
    split = from_shards(_shards(tmp_path, 90, "2KB")).train
    full = StreamBatches(split, 8, RAW, shuffle=True, seed=2, shuffle_buffer=20, workers=2)
    full.set_epoch(3)
    everything = [_ids(x) for x, _ in full]
    full.skip = 4  # what the trainer sets when resuming at batch 4 of epoch 3
    assert [_ids(x) for x, _ in full] == everything[4:]
    assert [_ids(x) for x, _ in full] == everything  # the offset applies once
    full.set_epoch(4)  # the same (persistent) workers see the new epoch: another order, every sample
    other = [i for x, _ in full for i in _ids(x)]
    assert sorted(other) == list(range(90)) and other != [i for b in everything for i in b]


def test_deterministic_fingerprint_of_a_shard_set(tmp_path, tiny_npz):
    from imgcls.engine.reproducibility import data_fingerprint

    write_shards(load_data(tiny_npz), tmp_path / "sh", shard_size=4000)
    a = data_fingerprint(load_data(str(tmp_path / "sh")))
    assert a == data_fingerprint(load_data(str(tmp_path / "sh"))) and a["images"]["train"] == 108


def test_predicting_a_shard_set_needs_an_output_folder(saved_model, tmp_path, capsys):
    sh = _shards(tmp_path, 20, "2KB")
    assert main(["predict", str(tmp_path / "model"), str(sh)]) == 1
    assert "--output DIR/" in capsys.readouterr().err


@pytest.mark.parametrize("channels", [1, 3])
def test_the_fast_path_for_images_at_their_size_gives_the_transforms_pixels(channels):
    from PIL import Image

    from imgcls.data.transforms import Preprocessing

    arr = np.random.default_rng(0).integers(0, 255, (12, 12, 3)[:2 if channels == 1 else 3]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    pre = Preprocessing(img_size=12, in_chans=channels, mean=(0.5,) * channels, std=(0.5,) * channels)
    fast = BytesDecoder(pre.pil_transform(), channels, exact=12)(buf.getvalue(), "x.png")
    assert torch.equal(fast, BytesDecoder(pre.pil_transform(), channels)(buf.getvalue(), "x.png"))


# ---------------------------------------------------------------------- resuming from recorded positions
@pytest.mark.parametrize("fmt, resize", [("webdataset", None), ("parquet", 8)])
def test_a_recorded_position_continues_the_epoch_with_every_sample_once(tmp_path, fmt, resize):
    data = load_data(_indexed_npz(tmp_path / "ix.npz", 150), val_split=0.0)
    write_shards(data, tmp_path / "sh", fmt=fmt, shard_size=parse_size("2KB"), resize=resize)
    split = from_shards(tmp_path / "sh").train
    assert split.shards.encoding == ("raw" if resize else "encoded")

    def stream():
        s = StreamBatches(split, 8, RAW, shuffle=True, seed=2, shuffle_buffer=30, workers=2)
        s.set_epoch(3)
        return s

    first, it = stream(), None
    done = []
    it = iter(first)
    for _ in range(7):
        done.append(_ids(next(it)[0]))
    pos = first.position()  # what a checkpoint after batch 7 records
    assert pos["epoch"] == 3 and len(pos["workers"]) == 2 and any(w["pending"] for w in pos["workers"])
    del it
    replay = stream()
    replay.load_position({**pos, "workers_n": 3})  # recorded with another layout: replayed, batches dropped
    replay.skip = 7
    assert len([x for x, _ in replay]) == len(replay) - 7
    again = stream()  # a new process: the recorded position, and the trainer's batch offset
    gone = 0  # shards wholly trained on before the checkpoint are never opened again: delete them
    for w, st in enumerate(pos["workers"]):
        start = 0
        for u, n in zip(again.stream.units(0, w), again.stream.unit_counts(0, w)):
            if start + n <= st["read"] and not any(start <= p < start + n for p in st["pending"]):
                Path(split.shards.shards[u.shard].url).unlink()
                gone += 1
            start += n
    assert gone >= 2
    again.load_position(pos)
    again.skip = 7
    rest = [_ids(x) for x, _ in again]
    seen = [i for b in done + rest for i in b]
    assert sorted(seen) == list(range(150)) and again.problems == []  # every sample once across the restart
    assert len(done) + len(rest) == len(again)  # and the epoch's number of steps


def test_recorded_positions_of_two_ranks_resume_each_rank_with_equal_steps(tmp_path):
    data = load_data(_indexed_npz(tmp_path / "ix.npz", 203), val_split=0.0)
    write_shards(data, tmp_path / "sh", shard_size=parse_size("3KB"))
    split = from_shards(tmp_path / "sh").train
    seen, steps = [], []
    for rank in (0, 1):  # each rank's stream as its process sees it (2 ranks x 2 workers)
        def stream():
            s = StreamBatches(split, 8, RAW, shuffle=True, seed=4, shuffle_buffer=16, workers=2)
            s.shard(rank, 2, even=True)
            s.set_epoch(2)
            return s
        first = stream()
        it = iter(first)
        done = [_ids(next(it)[0]) for _ in range(5)]
        pos = first.position()
        del it
        again = stream()
        again.load_position(pos)
        again.skip = 5
        rest = [_ids(x) for x, _ in again]
        steps.append(len(done) + len(rest))
        seen += [i for b in done + rest[:len(rest) - again.padded] for i in b]
    assert sorted(seen) == list(range(203)) and steps[0] == steps[1]  # once each, in equal steps


_CHILD = """
import sys, time
from imgcls.data.streaming import StreamBatches
log, delay = sys.argv[1], float(sys.argv[2])
orig = StreamBatches.__iter__
def logged(self):
    for x, y in orig(self):
        if self.stream.shuffle:  # the training stream: the ids of each batch handed to training
            ids = (x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist()
            with open(log, "a") as f:
                f.write(" ".join(map(str, ids)) + "\\n")
            time.sleep(delay)
        yield x, y
StreamBatches.__iter__ = logged
from imgcls.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_resume_after_sigkill_continues_mid_epoch_from_the_recorded_positions(tmp_path):
    import signal
    import time

    data = load_data(_indexed_npz(tmp_path / "ix.npz", 240, size=12), val_split=0.0)
    write_shards(data, tmp_path / "sh", shard_size=parse_size("6KB"))
    (tmp_path / "child.py").write_text(_CHILD)
    run = tmp_path / "runs" / "r"
    args = ["train", "--data", str(tmp_path / "sh"), "--epochs", "1", "--batch-size", "8", "--workers", "2",
            "--shuffle-buffer", "40", "--checkpoint-every", "0.000001", "--out", str(tmp_path / "runs"),
            "--name", "r", "--device", "cpu", "--model", "reference_cnn", "--img-size", "12"]
    killed = tmp_path / "killed.log"
    proc = subprocess.Popen([PY, str(tmp_path / "child.py"), str(killed), "0.05", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if killed.exists() and len(killed.read_text().splitlines()) >= 12:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)  # no handler, no last checkpoint
    proc.wait(timeout=60)
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    k = ck["batch_in_epoch"]
    assert ck["epoch"] == 1 and k > 0 and ck["data_position"][0]["epoch"] == 1
    before = [[int(i) for i in line.split()] for line in killed.read_text().splitlines()]
    assert k <= len(before) <= k + 1  # at most the batch in flight was handed out after the checkpoint
    resumed = tmp_path / "resumed.log"
    out = subprocess.run([PY, str(tmp_path / "child.py"), str(resumed), "0", "train", "--resume", str(run)],
                         env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    after = [[int(i) for i in line.split()] for line in resumed.read_text().splitlines()]
    seen = [i for b in before[:k] + after for i in b]
    # the checkpointed batches and the resumed run: the epoch's samples, each exactly once
    assert sorted(seen) == list(range(240)) and len(before[:k]) + len(after) == 30


def test_the_tar_reader_reads_what_tarfile_writes_pax_and_gnu(tmp_path):
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from imgcls.data.shardset import tar_samples

    long = "d/" + "x" * 120  # a name over 100 characters: a pax (or GNU longname) header
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"t{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as t:
            t.addfile(tarfile.TarInfo("d"))  # a directory-ish entry of size 0 is skipped by both
            for key, ext, data in [("a", "png", b"1" * 700), ("a", "cls", b"2"), (long, "jpg", b"3" * 513),
                                   (long, "cls", b"0"), ("b", "json", b"{}")]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        with open(path, "rb") as f:
            ours = list(tar_samples(f))
        with open(path, "rb") as f:
            theirs = [{k: v for k, v in s.items() if k != "__url__"}
                      for s in group_by_keys(dict(x, __url__="u") for x in tar_file_iterator(f))]
        assert ours == theirs and [s["__key__"] for s in ours] == ["a", long, "b"]


def test_raw_photo_shards_stream_the_decode_caches_rows(tmp_path):
    from imgcls.data.cache import CacheSpec
    from imgcls.data.pipeline import stream_batches
    from imgcls.data.transforms import Preprocessing

    root = write_folder(tmp_path / "photos", n_per_class=4, size=50)
    write_shards(load_data(root, val_split=0.0), tmp_path / "sh", resize=37, fmt="parquet")
    split = from_shards(tmp_path / "sh").train
    pre = Preprocessing(img_size=32, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3, resize="shorter_side",
                        crop_pct=0.875)  # its cache side: round(32 / 0.875) = 37
    for stored in (True, False):  # training (the cache's rows) and inference (their centre crop)
        b = stream_batches(split, pre, 5, stored=stored, workers=1)
        names = []
        b.on_sources = names.extend
        x = torch.cat([x for x, _ in b])
        want = torch.stack([CacheSpec(side=37, channels=3).decode(Path(p)) for p in names])
        assert torch.equal(x, want if stored else want[..., 2:34, 2:34])


def test_streamed_small_images_get_alternating_flips_like_in_memory_data(tmp_path):
    path = _indexed_npz(tmp_path / "ix.npz", 60)
    write_shards(load_data(path, val_split=0.0), tmp_path / "sh", shard_size=parse_size("2KB"))
    orig = torch.from_numpy(np.load(path)["x_train"])[:, None]
    known = {bytes(orig[i].numpy()): (i, False) for i in range(60)}
    known.update({bytes(orig[i].flip(-1).numpy()): (i, True) for i in range(60)})
    s = StreamBatches(from_shards(tmp_path / "sh").train, 8, RAW, shuffle=True, seed=1, shuffle_buffer=20, workers=1)
    s.alternate_flips(5)
    flipped = []
    for epoch in (1, 2):
        s.set_epoch(epoch)
        seen = dict(known[bytes(img.numpy())] for x, _ in s for img in x)
        assert sorted(seen) == list(range(60))
        flipped.append(seen)
    assert all(flipped[0][i] != flipped[1][i] for i in range(60))  # every image both ways over two epochs
    assert 15 <= sum(flipped[0].values()) <= 45


def test_auto_picks_the_fast_recipe_for_decoded_small_image_shards(tmp_path):
    """Shards of decoded pixels stream without decoding: `auto` trains them as it trains the
    same images in memory (the fast recipe, digits: the reference CNN); PNG shards get the
    default recipe, as files do."""
    from imgcls.config import TrainConfig
    from imgcls.engine.recipes import resolve_recipe
    from imgcls.runs import recipe_context

    data = load_data(_indexed_npz(tmp_path / "ix.npz", 5200), val_split=0.0)
    write_shards(data, tmp_path / "raw", resize=8)
    write_shards(data, tmp_path / "png")
    chosen = {}
    for where in ("raw", "png"):
        cfg = TrainConfig(data=str(tmp_path / where))
        ctx = recipe_context(cfg, load_data(cfg.data))
        assert ctx.in_memory is False and ctx.raw_stream is (where == "raw") and ctx.num_train == 5200
        chosen[where] = resolve_recipe(cfg, ctx)
    assert chosen["raw"].recipe == "fast" and chosen["raw"].epochs == 10  # ~50,000 samples
    assert "5,200 training images streamed as decoded pixels (digits)" in chosen["raw"].recipe_choice
    assert chosen["png"].recipe == "default"


def test_a_prefetched_epoch_is_the_epoch_it_would_have_been(tmp_path):
    """prefetch(e) (the trainer calls it while validating) starts the persistent workers on
    epoch e early: the batches are the ones a plain iteration of e gives; a prefetch of an
    epoch that does not come next is dropped, and the right epoch is read."""
    split = from_shards(_shards(tmp_path, 90, "2KB")).train

    def stream():
        return StreamBatches(split, 8, RAW, shuffle=True, seed=2, shuffle_buffer=20, workers=2)

    plain = stream()
    want = {}
    for e in (1, 2, 3):
        plain.set_epoch(e)
        want[e] = [_ids(x) for x, _ in plain]
    ahead = stream()
    ahead.set_epoch(1)
    assert [_ids(x) for x, _ in ahead] == want[1]
    ahead.prefetch(2)
    assert ahead._next is not None  # persistent workers (fork): the epoch was started early
    ahead.set_epoch(2)
    assert [_ids(x) for x, _ in ahead] == want[2]
    ahead.prefetch(5)  # not the epoch that comes next (e.g. a resumed run): dropped
    ahead.set_epoch(3)
    assert [_ids(x) for x, _ in ahead] == want[3]
    assert sorted(i for b in want[2] for i in b) == list(range(90))


def test_streamed_validation_workers_fork_before_the_first_step_and_never_again(tmp_path, tiny_npz, monkeypatch):
    """Training from shards with a validation split forks every loader worker (training's and
    validation's) before the first epoch ends: a fork at the first validation would make the
    next epoch's writes copy-on-write faults (measured: ~120k, 0.5 s, on 245 photos)."""
    import imgcls.engine.trainer as T
    from imgcls import Classifier

    write_shards(load_data(tiny_npz), tmp_path / "sh", shard_size=4000)
    events: list = []
    real_fork, real_epoch = os.fork, T.Trainer._train_epoch

    def fork():
        events.append("fork")
        return real_fork()

    def train_epoch(self, train, state):
        real_epoch(self, train, state)
        events.append(f"epoch {state.epoch}")

    monkeypatch.setattr(os, "fork", fork)
    monkeypatch.setattr(T.Trainer, "_train_epoch", train_epoch)
    clf = Classifier.create("reference_cnn", classes=["a", "b", "c"], in_chans=1, img_size=16, seed=0)
    summary = clf.fit(str(tmp_path / "sh"), epochs=3, batch_size=16, lr=3e-3, workers=2, progress=False)
    assert summary["val_images"] == 12 and len(clf.history) == 3
    assert events == ["fork"] * 4 + ["epoch 1", "epoch 2", "epoch 3"]  # 2 workers each for train and val
    assert all(h["val_acc"] == h["val_acc"] for h in clf.history)  # every epoch validated


def test_parquet_rows_without_a_label_are_named_and_pandas_is_never_imported(tmp_path):
    """A Parquet row with a null label is reported (shard and key) and skipped; the reader
    takes labels and validity from pyarrow's buffers, so a loader worker never imports
    pandas (pyarrow's fill_null / to_numpy would: ~300 modules per worker)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sh = _shards(tmp_path, 40, "2KB", fmt="parquet")
    victim = sorted(sh.glob("train-*.parquet"))[0]
    t = pq.read_table(victim)
    labels = t.column("label").to_pylist()
    labels[0] = None
    pq.write_table(t.set_column(t.schema.get_field_index("label"), "label", pa.array(labels, pa.int64())), victim)
    _reindex(sh)
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from torchvision.transforms import v2\n"
            "from imgcls.data.shardset import from_shards\n"
            "from imgcls.data.streaming import BytesDecoder, StreamBatches\n"
            "raw = BytesDecoder(v2.Compose([v2.PILToTensor()]), 1)\n"
            f"b = StreamBatches(from_shards({str(sh)!r}).train, 8, raw, workers=0)\n"
            "n = sum(len(y) for _, y in b)\n"
            "print(n, b.problems, 'pandas' in sys.modules)")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n, rest = out.stdout.strip().split(" ", 1)
    assert n == "39" and f"{victim.name}:" in rest and "no image or label" in rest
    assert rest.endswith("False")


# ---------------------------------------------------------------------- prediction jobs: raw shards, all skipped, summary
def test_prediction_reads_raw_pixel_shards_as_training_does(saved_model, tmp_path):
    """`imgcls shard --resize` shards gave 0 predictions: prediction_split rebuilt the ShardSplit
    without its encoding, so every .npy member was 'not an image'."""
    from imgcls.data.pipeline import prediction_split
    from imgcls.engine.batch_predict import Ranks

    root = write_folder(tmp_path / "imgs", n_per_class=6, size=20, splits=("train", "val"))
    write_shards(load_data(root), tmp_path / "sh", resize=24)
    split, _ = prediction_split([str(tmp_path / "sh")], saved_model.preprocessing)
    trained = from_shards(str(tmp_path / "sh")).train.shards
    assert (split.shards.encoding, split.shards.raw_shape) == (trained.encoding, trained.raw_shape) == ("raw", (24, 24, 3))
    _parts(saved_model, tmp_path / "sh", tmp_path / "preds", "parquet", Ranks(0, 1))
    rows = _rows(tmp_path / "preds")
    assert len(rows) == 36 and not any(r["error"] for r in rows)


def test_a_prediction_part_whose_every_sample_is_skipped_is_an_error_not_a_finished_part(saved_model, tmp_path):
    """Every sample skipped gave an empty part, exit 0, and a rerun said 'already complete'."""
    import dataclasses

    from imgcls.data.pipeline import prediction_split
    from imgcls.engine.batch_predict import Ranks, predict_parts

    root = write_folder(tmp_path / "imgs", n_per_class=4, size=20)
    write_shards(load_data(root, val_split=0.0), tmp_path / "sh", resize=24)
    split, names = prediction_split([str(tmp_path / "sh")], saved_model.preprocessing)
    split.shards = dataclasses.replace(split.shards, encoding="encoded", raw_shape=None)  # every .npy: not an image
    for fmt in ("parquet", "jsonl"):
        with pytest.raises(ImgclsError, match=r"all 12 sample\(s\) .* were skipped \(first: .*npy: not an image"):
            predict_parts(saved_model, split, names, tmp_path / fmt, fmt=fmt, workers=0, progress=False,
                          ranks=Ranks(0, 1))
        assert not list((tmp_path / fmt).glob(f"part-*.{fmt}"))  # not marked complete: a rerun does it again
    bad = tmp_path / "bad"
    for i in range(3):
        (bad / "cat").mkdir(parents=True, exist_ok=True)
        (bad / "cat" / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(ImgclsError, match=r"none of its 3 images could be read"):
        _parts(saved_model, bad, tmp_path / "files", "parquet", Ranks(0, 1))
    assert not list((tmp_path / "files").glob("part-*"))


def test_the_job_summary_counts_every_part(saved_model, tmp_path, capsys):
    """Rank 0's summary named only its own part (199 of 398 rows)."""
    from imgcls.engine.batch_predict import Ranks, announce

    root = write_folder(tmp_path / "imgs", n_per_class=5, size=20)
    out = tmp_path / "preds"
    _parts(saved_model, root, out, "parquet", Ranks(1, 2))
    announce(_parts(saved_model, root, out, "parquet", Ranks(0, 2)), Ranks(0, 2))
    err = capsys.readouterr().err
    assert "15 rows in 2 of 2 part(s)" in err and "part-00000-of-00002.parquet 7 rows" in err \
        and "part-00001-of-00002.parquet 8 rows" in err
    announce(_parts(saved_model, root, out, "parquet", Ranks(0, 2)), Ranks(0, 2))
    assert "15 rows in 2 of 2 part(s)" in capsys.readouterr().err  # a rerun still accounts for the whole job


def test_a_shard_set_without_validation_says_so_once(tmp_path, capsys):
    """No hold-out from a stream: the note was only in model.json's data_notes, three times."""
    from imgcls.data.pipeline import TrainSettings, training_inputs
    from imgcls.data.transforms import Preprocessing

    sh = _shards(tmp_path, 30, "2KB")
    data = load_data(load_data(load_data(str(sh))))  # as each step of a run calls it
    inp = training_inputs(data, Preprocessing(8, 1, (0.5,), (0.5,)), TrainSettings(workers=0), 8,
                          device=torch.device("cpu"))
    assert inp.val is None and sum("no validation split" in n for n in inp.data.notes) == 1
    err = capsys.readouterr().err
    assert err.count("no validation split") == 1 and "training accuracy" in err


def test_shard_cli_names_the_index_without_a_doubled_slash(tiny_npz, tmp_path, capsys):
    assert main(["shard", str(tiny_npz), "--out", f"{tmp_path}/sh/"]) == 0
    assert f"index: {tmp_path}/sh/index.json)" in capsys.readouterr().out
