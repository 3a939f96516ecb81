"""Decode once (cache), skipping and reporting unreadable files, balance, manifests, --classes."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from imgcls import train
from imgcls.cli import main
from imgcls.data.balance import plan_balance
from imgcls.data.cache import CacheSpec, center_crop, decoded_split
from imgcls.data.loaders import BalancedOrder, Batches, ShuffledOrder
from imgcls.data.records import Split
from imgcls.data.sources import from_folder, load_data
from imgcls.data.transforms import BatchResizedCrop, Preprocessing
from imgcls.errors import ImgclsError
from tests.imagefiles import jpeg_bytes, noise, write_bad_files

PRE = Preprocessing(img_size=28, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3, resize="shorter_side", crop_pct=0.875)


def photo_tree(root, n=6, classes=("ants", "bees"), size=(36, 48)):
    for c_i, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / c / f"{i}.jpg").write_bytes(jpeg_bytes(noise(*size, seed=100 * c_i + i)))
    return root


def test_cache_decodes_once_and_skips_bad_files(tmp_path):
    root = photo_tree(tmp_path / "d")
    bad = write_bad_files(root / "ants")
    data = from_folder(root)
    cache = tmp_path / "cache"
    first = decoded_split(data.train, PRE, cache_root=cache, workers=0)
    assert first.split.images.shape == (12, 3, 32, 32) and first.split.images.dtype == torch.uint8
    assert first.decoded == 12 and first.split.class_counts(2) == [6, 6]
    assert {p.name: why.split(" (")[0] for p, why in first.skipped} == bad
    second = decoded_split(data.train, PRE, cache_root=cache, workers=0)
    assert second.decoded == 0 and torch.equal(first.split.images, second.split.images)
    assert len(second.skipped) == 4  # bad files are reported again, every run
    # editing a file changes its key: only that file is decoded again
    target = root / "bees" / "0.jpg"
    target.write_bytes(jpeg_bytes(noise(36, 48, seed=7)))
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = decoded_split(data.train, PRE, cache_root=cache, workers=2)
    assert third.decoded == 1 and not torch.equal(third.split.images, first.split.images)
    assert (cache / CacheSpec.for_preprocessing(PRE).key / "images.u8").stat().st_size == 13 * 3 * 32 * 32


def test_cache_command_lists_prunes_and_clears(tmp_path, capsys):
    root = photo_tree(tmp_path / "d", n=3)
    data = from_folder(root)
    cache = tmp_path / "cache"
    first = decoded_split(data.train, PRE, cache_root=cache, workers=0)
    assert first.split.images.is_contiguous(memory_format=torch.channels_last)  # stored HWC
    (cache / "v1-shorter_side-32px-3ch-bilinear").mkdir()  # an older format's folder
    (cache / "v1-shorter_side-32px-3ch-bilinear" / "images.u8").write_bytes(b"x" * 100)
    edited = root / "bees" / "0.jpg"
    edited.write_bytes(jpeg_bytes(noise(36, 48, seed=9)))
    os.utime(edited, ns=(time.time_ns(), time.time_ns() + 10**9))
    (root / "ants" / "2.jpg").unlink()
    data = from_folder(root)
    second = decoded_split(data.train, PRE, cache_root=cache, workers=0)  # decodes the edited file
    assert second.decoded == 1
    key = CacheSpec.for_preprocessing(PRE).key
    assert main(["cache", "--dir", str(cache), "--json"]) == 0
    entries = {e["key"]: e for e in json.loads(capsys.readouterr().out)["entries"]}
    assert entries[key]["rows"] == 7 and entries[key]["stale_rows"] == 2  # old copy of the edit, the deleted file
    assert not entries["v1-shorter_side-32px-3ch-bilinear"]["current_format"]
    assert main(["cache", "--dir", str(cache), "--prune", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["kept_rows"], result["dropped_rows"]) == (5, 2)
    assert result["freed_bytes"] == 2 * 3 * 32 * 32 + 100
    assert not (cache / "v1-shorter_side-32px-3ch-bilinear").exists()
    third = decoded_split(data.train, PRE, cache_root=cache, workers=0)  # everything still cached, same pixels
    assert third.decoded == 0 and torch.equal(third.split.images, second.split.images)
    assert main(["cache", "--dir", str(cache)]) == 0
    assert "5 images" in capsys.readouterr().out
    assert main(["cache", "--dir", str(cache), "--clear"]) == 0
    assert not cache.exists() and "cleared" in capsys.readouterr().out


def test_cached_center_crop_equals_the_file_transform(tmp_path):
    root = photo_tree(tmp_path / "d", n=2, size=(45, 61))
    data = from_folder(root)
    d = decoded_split(data.train, PRE, cache_root=tmp_path / "c", workers=0)
    from imgcls.data.decode import load_image

    for path, cached in zip(d.paths, center_crop(d.split.images, 28)):
        direct = PRE.pil_transform()(load_image(path, 3, min_side=32))
        assert torch.equal(direct, cached)


def test_no_disk_cache_keeps_nothing_on_disk(tmp_path):
    root = photo_tree(tmp_path / "d", n=2)
    d = decoded_split(from_folder(root).train, PRE, cache=False, cache_root=tmp_path / "c", workers=0)
    assert d.split.images.shape[0] == 4 and not (tmp_path / "c").exists()


def test_epoch_orders_and_center_crop():
    labels = torch.tensor([0] * 90 + [1] * 10)
    draws = torch.cat([BalancedOrder(labels, seed=0).indices(e) for e in range(5)])
    share = (labels[draws] == 1).float().mean().item()
    assert 0.4 < share < 0.6  # class 1 is 10% of the data, half of the draws
    assert torch.equal(BalancedOrder(labels, 3).indices(2), BalancedOrder(labels, 3).indices(2))
    assert sorted(ShuffledOrder(10, True, seed=1).indices(0).tolist()) == list(range(10))
    # a distributed shard reads its part of whatever order the epoch has (here: balanced)
    split = Split(labels=labels, images=torch.zeros(100, 1, 2, 2, dtype=torch.uint8))
    parts = []
    for rank in range(2):
        b = Batches(split, 10, order=BalancedOrder(labels, seed=0), drop_last=True)
        b.shard(rank, 2, even=True)
        parts.append(torch.cat([y for _, y in b]))
    assert [len(p) for p in parts] == [50, 50] and 0.35 < torch.cat(parts).float().mean() < 0.65
    images = torch.arange(4 * 1 * 6 * 6, dtype=torch.uint8).view(4, 1, 6, 6)
    b = Batches(Split(labels=torch.zeros(4, dtype=torch.long), images=images), 2, center_crop=4)
    x, _ = next(iter(b))
    assert torch.equal(x, images[:2, :, 1:5, 1:5])


def test_batch_crops_in_workers_are_random_crops_and_reproducible():
    # channels_last storage, as the decode cache keeps it
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    split = Split(labels=torch.arange(12) % 2, images=images)
    crop = BatchResizedCrop(28, (0.25, 1.0), hflip=True)

    def epoch(workers, e=1):
        torch.manual_seed(0)
        b = Batches(split, 4, shuffle=True, seed=1, transform=crop, workers=workers)
        b.set_epoch(e)
        return list(b)

    batches = epoch(0)
    x, y = batches[0]
    assert x.shape == (4, 3, 28, 28) and x.dtype == torch.uint8
    assert x.is_contiguous(memory_format=torch.channels_last) and len(batches) == 3
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == [0] * 6 + [1] * 6
    again = epoch(2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, epoch(2)))  # same seed, same crops
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(again, epoch(2, e=2)))  # a new epoch, new crops
    # a full-image "crop" from the workers is each labelled image itself (rows and labels stay paired)
    whole = BatchResizedCrop(32, (1.0, 1.0), (1.0, 1.0))
    pairs = Split(labels=torch.arange(12), images=images)
    b = Batches(pairs, 5, shuffle=True, seed=3, transform=whole, workers=2)
    b.shard(1, 2, even=True)  # and the distributed share goes through the batch sampler
    got = list(b)
    assert len(got) == len(b) == 2
    for x, y in got:
        assert torch.equal(x, images[y])


def test_batch_resized_crop_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF

    x = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    aug = BatchResizedCrop(24, scale=(0.3, 1.0))
    index = torch.tensor([5, 0, 3])
    out = aug(x, torch.Generator().manual_seed(2), index=index)
    boxes = aug.boxes(3, 40, 40, torch.Generator().manual_seed(2)).long().tolist()
    for o, j, (top, left, h, w) in zip(out, index.tolist(), boxes):
        assert torch.equal(o, TF.resized_crop(x[j], top, left, h, w, [24, 24], antialias=True))


def test_batch_resized_crop():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    aug = BatchResizedCrop(28, scale=(0.25, 1.0), hflip=True)
    boxes = aug.boxes(2000, 32, 32, gen)
    area = boxes[:, 2] * boxes[:, 3] / (32 * 32)
    assert area.min() >= 0.2 and area.max() <= 1.0
    assert (boxes[:, 0] + boxes[:, 2] <= 32).all() and (boxes[:, 1] + boxes[:, 3] <= 32).all()
    out = aug(x, gen)  # CPU: uint8 (torchvision resized_crop per image)
    assert out.shape == (64, 3, 28, 28) and out.dtype == torch.uint8
    grid = aug(x.float() / 255, gen)  # float input: the batched grid_sample path accelerators use
    assert grid.shape == (64, 3, 28, 28) and grid.dtype == torch.float32 and 0 <= grid.min() and grid.max() <= 1
    for inp in (x, x.float() / 255):
        whole = BatchResizedCrop(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))(inp)  # the whole image, unchanged
        assert torch.allclose(whole.float() * (255 if whole.is_floating_point() else 1), x.float(), atol=1e-3)
        flipped = BatchResizedCrop(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True)(inp, gen).float()
        flipped = flipped * 255 if inp.is_floating_point() else flipped
        is_flip = [torch.allclose(f, img.flip(-1).float(), atol=1e-3) for f, img in zip(flipped, x)]
        is_same = [torch.allclose(f, img.float(), atol=1e-3) for f, img in zip(flipped, x)]
        assert all(a or b for a, b in zip(is_flip, is_same)) and 10 < sum(is_flip) < 54
    # both paths crop the same box: a crop of a smooth image agrees to a few grey levels
    smooth = torch.linspace(0, 255, 32).view(1, 1, 1, 32).expand(4, 3, 32, 32).round().to(torch.uint8).contiguous()
    a = BatchResizedCrop(16, scale=(0.3, 0.6))(smooth, torch.Generator().manual_seed(5)).float()
    b = BatchResizedCrop(16, scale=(0.3, 0.6))(smooth.float() / 255, torch.Generator().manual_seed(5)) * 255
    assert (a - b).abs().max() < 4


def test_plan_balance():
    labels = torch.tensor([0] * 30 + [1] * 6 + [2] * 24)
    plan = plan_balance(labels, ["a", "b", "c"], "auto")
    assert plan.mode == "weights" and plan.ratio == 5.0
    assert plan.class_weights == pytest.approx([60 / 90, 60 / 18, 60 / 72])
    assert plan_balance(torch.tensor([0, 0, 1]), ["a", "b"], "auto").mode == "none"
    assert plan_balance(labels, ["a", "b", "c"], "sampler").class_weights is None


def test_train_folder_with_bad_files_balance_and_strict(tmp_path, capsys):
    root = photo_tree(tmp_path / "d", n=4, classes=("bees",))
    photo_tree(root, n=16, classes=("ants",))
    write_bad_files(root / "ants")
    out = tmp_path / "runs"
    cfg = {"data": str(root), "img_size": 24, "epochs": 1, "batch_size": 8, "workers": 0, "out": str(out),
           "val_split": 0.25}
    result = train(cfg, progress=False)
    err = capsys.readouterr().err
    csv_path = result.run_dir / "skipped.csv"
    assert f"imgcls: skipped 4 of 24 files: 1 truncated or corrupt, 1 empty file, 1 not an image, " \
           f"1 too many pixels (see {csv_path})" in err.replace("\n", " ") or "skipped 4 of 24 files" in err
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "split,path,reason" and len(rows) == 5
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["training"]["balance"]["mode"] == "weights"  # 12 ants vs 3 bees in train: ratio 4
    assert metrics["training"]["balance"]["imbalance_ratio"] == 4.0
    assert "class-weighted loss (--balance auto)" in err
    # the CLI: --strict makes them a one-line error, exit 1
    code = main(["train", "--data", str(root), "--img-size", "24", "--epochs", "1", "--workers", "0",
                 "--out", str(out), "--strict"])
    assert code == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("imgcls train: error: 4 of 24 files cannot be used") and "\n" not in line


def test_manifest_csv_tsv_and_classes(tmp_path):
    root = photo_tree(tmp_path / "imgs", n=3)
    rows = ["filename,label,split"] + [f"imgs/{c}/{i}.jpg,{c},{'val' if i == 2 else ''}"
                                       for c in ("ants", "bees") for i in range(3)]
    rows.append("imgs/ants/missing.jpg,ants,train")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    d = load_data(tmp_path / "m.csv", val_split=0.0)
    assert d.classes == ["ants", "bees"] and len(d.train) == 5 and len(d.val) == 2 and d.test is None
    assert d.train.paths[0] == tmp_path / "imgs/ants/0.jpg"  # relative to the manifest
    dec = decoded_split(d.train, PRE, cache_root=tmp_path / "c", workers=0)
    assert [(p.name, why) for p, why in dec.skipped] == [("missing.jpg", "file not found")]
    (root / "list.tsv").write_text("".join(f"{c}/{i}.jpg\t{c}\n" for c in ("ants", "bees") for i in range(3)))
    t = load_data(root / "list.tsv", val_split=0.0, classes=["bees", "ants"])
    assert t.classes == ["bees", "ants"] and t.train.labels.tolist() == [1, 1, 1, 0, 0, 0]
    with pytest.raises(ImgclsError, match=r"list.tsv line 4: unknown label 'bees' \(not in --classes\)"):
        load_data(root / "list.tsv", classes=["ants", "wasps"])  # the row is named
    f = load_data(root, val_split=0.0, classes=["bees", "ants"])
    assert f.classes == ["bees", "ants"] and f.train.class_counts(2) == [3, 3]
    assert f.train.labels[f.train.paths.index(root / "bees" / "0.jpg")] == 0
    with pytest.raises(ImgclsError, match=r"class folder\(s\) \['bees'\] that --classes does not list"):
        from_folder(root, classes=["ants", "wasps"])


def test_train_with_classes_flag_and_manifest(tmp_path):
    root = photo_tree(tmp_path / "imgs", n=4)
    (tmp_path / "m.csv").write_text("".join(f"imgs/{c}/{i}.jpg,{c}\n" for c in ("ants", "bees") for i in range(4)))
    result = train({"data": str(tmp_path / "m.csv"), "classes": "bees,ants", "img_size": 16, "epochs": 1,
                    "workers": 0, "out": str(tmp_path / "r"), "val_split": 0.25, "augment": "none", "cache": False},
                   progress=False)
    assert result.summary["files"]["decoded_now"] == 8
    assert result.classifier.classes == ["bees", "ants"]
    assert "classes:\n- bees\n- ants" in (result.run_dir / "config.yaml").read_text()
    m = result.classifier.evaluate(root)  # a plain folder given to evaluate is evaluated whole
    assert (m["num_images"], m["split"]) == (8, "all")
    m = result.classifier.evaluate(root, split="val")  # the held-out val of the folder, as in training
    assert m["num_images"] == 2
    aligned = result.classifier.check_classes(load_data(root, val_split=0.0))  # folder order: ants, bees
    assert aligned.classes == ["bees", "ants"]
    assert aligned.train.labels[aligned.train.paths.index(root / "bees" / "1.jpg")] == 0


@pytest.mark.slow
@pytest.mark.shared_data
def test_hymenoptera_trains_end_to_end_from_the_cache(shared_data, tmp_path):
    """The real folder (397 JPEGs and one GIF placeholder) trains; a second run decodes nothing."""
    cfg = {"data": str(shared_data / "hymenoptera"), "model": "reference_cnn", "img_size": 48, "epochs": 1,
           "batch_size": 32, "out": str(tmp_path / "runs")}
    first = train(cfg, progress=False)
    files = first.summary["files"]
    assert files == {"files": 398, "skipped": 0, "decoded_now": 398, "skipped_list": []}
    assert first.summary["train_images"] == 245 and first.metrics["num_images"] == 153
    assert first.summary["augment"]["preset"] == "photo" and first.summary["balance"]["mode"] == "none"
    second = train(cfg, progress=False)
    assert second.summary["files"]["decoded_now"] == 0
    assert (second.run_dir / "model.safetensors").is_file()


def test_prune_and_clear_refuse_a_folder_that_is_not_a_cache(tmp_path, capsys):
    home = tmp_path / "home"  # e.g. a mistyped --dir ~
    (home / "keep").mkdir(parents=True)
    (home / "keep" / "file.txt").write_text("precious\n")
    (home / "v1-looks-like-a-key").mkdir()
    for flag in ("--prune", "--clear"):
        assert main(["cache", "--dir", str(home), flag]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"refusing to {flag[2:]} {home}: it is not an imgcls decode cache" in err
    assert (home / "keep" / "file.txt").read_text() == "precious\n" and (home / "v1-looks-like-a-key").is_dir()


def test_the_cache_marks_its_folder_and_prune_touches_only_cache_folders(tmp_path, capsys):
    from imgcls.data.cache import MARKER

    root = photo_tree(tmp_path / "d", n=2)
    cache = tmp_path / "cache"
    decoded_split(from_folder(root).train, PRE, cache_root=cache, workers=0)
    assert (cache / MARKER).read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    (cache / "notes").mkdir()  # something a user put there: not a cache folder
    (cache / "v2-shorter_side-32px-3ch-bilinear").mkdir()  # an older format's folder
    assert main(["cache", "--dir", str(cache)]) == 0
    assert "notes: not a cache folder (left alone)" in capsys.readouterr().out
    assert main(["cache", "--dir", str(cache), "--prune"]) == 0
    assert (cache / "notes").is_dir() and not (cache / "v2-shorter_side-32px-3ch-bilinear").exists()
    # a cache written before the marker existed (only cache folders in it) is adopted on the next write
    old = tmp_path / "old"
    (old / "v2-shorter_side-32px-3ch-bilinear").mkdir(parents=True)
    decoded_split(from_folder(root).train, PRE, cache_root=old, workers=0)
    assert (old / MARKER).is_file()
    # ... but a folder holding anything else never is: the cache is written, prune still refuses
    mixed = tmp_path / "mixed"
    (mixed / "photos").mkdir(parents=True)
    decoded_split(from_folder(root).train, PRE, cache_root=mixed, workers=0)
    assert not (mixed / MARKER).exists()
    assert main(["cache", "--dir", str(mixed), "--clear"]) == 1 and (mixed / "photos").is_dir()


def test_an_edit_that_keeps_size_and_mtime_is_decoded_again(tmp_path):
    from PIL import Image

    p = tmp_path / "x.bmp"
    Image.new("RGB", (40, 40), (255, 0, 0)).save(p)
    pre = Preprocessing(img_size=32, in_chans=3, mean=(0,) * 3, std=(1,) * 3, resize="shorter_side", crop_pct=0.875)
    split = Split(labels=torch.zeros(1, dtype=torch.long), paths=[p])
    before = decoded_split(split, pre, cache_root=tmp_path / "cache")
    assert before.split.images[0, :, 0, 0].tolist() == [255, 0, 0]
    st = os.stat(p)
    time.sleep(0.01)
    Image.new("RGB", (40, 40), (0, 0, 255)).save(p)  # same size (BMP)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p, rsync -t, exiftool -P, touch -r do
    after = decoded_split(split, pre, cache_root=tmp_path / "cache")
    assert after.split.images[0, :, 0, 0].tolist() == [0, 0, 255]
