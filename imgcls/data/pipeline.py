"""The one data pipeline: every batch that training, evaluation, prediction, the LR
finder, explanations, export checks and the server see is built here, from an
``ImageData`` / ``Split``, the model's ``Preprocessing`` and the run's settings.

    source ─▶ ImageData ─▶ decode pass (files, once, cached) ─▶ Batches (uint8) ─▶ device:
                                                                augment + normalise

* :func:`derive_preprocessing` - what a model's preprocessing becomes for its training
  data (a new object; nothing is changed in place).
* :func:`training_inputs` - decode pass, augmentation, class balance, this process's
  shard, alternating flips: the training and validation batches of a run.
* :func:`eval_batches` - batches in order for evaluation and prediction.
* :func:`as_split` - files, folders, PIL images or arrays a user hands to ``predict``.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.data.balance import BalancePlan, plan_balance
from imgcls.data.cache import CacheSpec, decode_min_side, decoded_split
from imgcls.data.decode import images_in_folder, to_mode
from imgcls.data.decode_pass import DecodedData, decode_data
from imgcls.data.loaders import BalancedOrder, Batches, default_workers
from imgcls.data.records import ImageData, Split
from imgcls.data.sources import UNUSED_FOLDER, _to_nchw_uint8, load_data
from imgcls.data.streaming import BytesDecoder, StreamBatches
from imgcls.data.transforms import (AugmentSpec, BatchAugment, BatchResizedCrop, Preprocessing, StrongAugment,
                                    augment_preset)
from imgcls.errors import ImgclsError


def data_stats(images: torch.Tensor, in_chans: int, max_images: int = 10_000) -> tuple[tuple, tuple]:
    """Per-channel mean/std of (a sample of) uint8 (or uint16) training images, after channel
    conversion."""
    x = images[:: max(1, len(images) // max_images)].float() / (65535.0 if images.dtype == torch.uint16 else 255.0)
    if x.shape[1] != in_chans:
        x = x.mean(1, keepdim=True).expand(-1, in_chans, -1, -1) if in_chans == 3 else x.mean(1, keepdim=True)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def require_train(data: ImageData) -> ImageData:
    """``data`` when it has training images; else the one-line refusal training gives."""
    if data.train is None or not len(data.train):
        have = [s for s in ("val", "test") if getattr(data, s) is not None]
        raise ImgclsError(f"{data.name} has no training images" + (f" (it has {'/, '.join(have)}/ but no train/ "
                                                                  "folder)" if have else ""),
                          "add train/<class>/ folders; a folder of only val/ or test/ can be evaluated on")
    return data


def derive_preprocessing(pre: Preprocessing, data: ImageData, pretrained: bool) -> Preprocessing:
    """The preprocessing a model trains with on ``data``. A pretrained model keeps its own
    (its pretrained mean/std, resize and crop); otherwise it follows the data: the
    statistics of in-memory images, the photo-style resize + centre crop for files."""
    if pretrained:
        return dataclasses.replace(pre)
    if data.train.in_memory:
        mean, std = data_stats(data.train.images, pre.in_chans)
        return dataclasses.replace(pre, mean=mean, std=std)
    if data.train.streamed and data.native_size is not None:  # in-memory data written as shards
        stats = (data.stats or {}).get(str(pre.in_chans))
        return dataclasses.replace(pre, **({"mean": tuple(stats["mean"]), "std": tuple(stats["std"])} if stats else {}))
    return dataclasses.replace(pre, resize="shorter_side", crop_pct=0.875)


# ---------------------------------------------------------------------- evaluation / prediction
def stored_crop(split: Split, pre: Preprocessing) -> int | None:
    """The centre crop an in-memory split needs: decoded-once photos are stored
    ``img_size / crop_pct`` square, larger than the model input (None: already its size)."""
    big = pre.resize == "shorter_side" and split.images.shape[-1] > pre.img_size
    return pre.img_size if big else None


def eval_batches(split: Split, pre: Preprocessing, batch_size: int, *, workers: int | None = None,
                 device: torch.device | None = None, skipped: dict[int, str] | None = None) -> Batches:
    """Every image of ``split`` once, in order, as the model sees it at inference: files
    decoded in worker processes (``skipped``: see :class:`Batches`), decoded-once photos
    (stored ``img_size / crop_pct`` square) centre-cropped."""
    pin = device is not None and device.type == "cuda"
    if split.in_memory:
        return Batches(split, batch_size, pin_memory=pin, center_crop=stored_crop(split, pre))
    if split.streamed:
        return stream_batches(split, pre, batch_size, workers=workers, pin=pin)  # bad members: reported, skipped
    return Batches(split, batch_size, transform=pre.pil_transform(), channels=pre.in_chans, size=pre.img_size,
                   workers=workers, pin_memory=pin, skipped=skipped,
                   min_side=decode_min_side(pre))  # the same reduced JPEG decode as the cache


def array_images(images: Any) -> torch.Tensor | None:
    """``images`` as uint8 ``(N, C, H, W)`` when it is an array or tensor - one ``(H, W)`` or
    ``(H, W, C)`` image, or a stack - else None (files, folders, PIL images)."""
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    if not isinstance(images, np.ndarray):
        return None
    x = images
    if x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3, 4)):
        x = x[None]  # one (H,W) or (H,W,C) image
    return _to_nchw_uint8(x, "images")


def as_split(images: Any, pre: Preprocessing) -> tuple[Split, list[str]]:
    """What a user hands to ``predict`` (files, folders - recursively -, PIL images, arrays
    or tensors) as one Split, with a source name per image."""
    from PIL import Image, ImageOps

    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    t = array_images(images)
    if t is not None:
        side = CacheSpec.for_preprocessing(pre).side
        if pre.resize == "shorter_side" and t.shape[-2:] != (side, side):
            # a user's photo as an array: resized and cropped as the same photo as a file or
            # PIL image is (an array at the stored size is a decode-once row: stored_crop)
            geometry = pre.tensor_geometry()
            t = torch.stack([geometry(img) for img in t])
        return Split(labels=torch.zeros(len(t), dtype=torch.long), images=t), [f"array[{i}]" for i in range(len(t))]
    paths: list[Path] = []
    pil: list[torch.Tensor] = []
    names: list[str] = []
    for item in images:
        if isinstance(item, Image.Image):
            # upright as the same photo is from its file (decode.open_pillow) or an upload
            pil.append(pre.pil_transform()(to_mode(ImageOps.exif_transpose(item), pre.in_chans)))
            names.append(f"image[{len(names)}]")
            continue
        p = Path(item)
        if p.is_dir():
            found = images_in_folder(p)
            paths += found
            names += [str(f) for f in found]
        elif p.is_file():
            paths.append(p)
            names.append(str(p))
        else:
            raise ImgclsError(f"image not found: {p}", "check the path")
    if pil and paths:
        raise ImgclsError("mixing PIL images and file paths in one call", "predict them in two calls")
    if pil:
        return Split(labels=torch.zeros(len(pil), dtype=torch.long), images=torch.stack(pil)), names
    if not paths:
        raise ImgclsError("no images given", "give image files, folders, PIL images or arrays")
    return Split(labels=torch.zeros(len(paths), dtype=torch.long), paths=paths), names


def evaluation_data(spec: Any, split: str | None = None, val_split: float = 0.1, seed: int = 0,
                    group_by: str | None = None, classes: list[str] | None = None) -> tuple[ImageData, str, str]:
    """The data to evaluate on, the name of the split to report and the attribute of
    ``data`` that holds it. ``split=None``: the test split, else the data's *own*
    validation split; data with neither (a plain folder of class folders, 240 photos) is
    evaluated whole - ``"all"``, never a 10% sample. An ``ImageData`` (what training
    loaded, with its held-out validation split) and ``split="val"`` hold validation out
    exactly as training did (``val_split``, ``seed``, and ``classes``: the model's class list,
    whose order decides which images a stratified hold-out draws)."""
    if isinstance(spec, ImageData) or split is not None:
        data = load_data(spec, val_split=val_split, seed=seed, group_by=group_by, like=classes)
        name = split or data.eval_split()[0]
        return data, name, name
    data = load_data(spec, val_split=0.0)
    for name in ("test", "val"):
        part = getattr(data, name)
        if part is not None and len(part):
            return data, name, name
    whole = dataclasses.replace(data, train=None, test=data.train,
                                notes=[*data.notes, f"evaluated whole: all {len(data.train)} images"])
    return whole, "all", "test"


def expand_frames(split: Split, names: list[str], pre: Preprocessing) -> tuple[Split, list[str], dict[int, str]]:
    """``frames="all"`` at prediction: every frame of a multi-frame (DICOM) file becomes a row
    of its own, named ``file#frameN``, decoded once through the cache as training and
    evaluation decode it. An unreadable file keeps one blank row, returned with its reason
    (row index -> reason), so the caller reports it in place."""
    d = decoded_split(split, pre)
    bad = {str(p): why for p, why in d.skipped}
    rows: dict[str, list[tuple[int, int]]] = {}
    for row, (p, frame) in enumerate(zip(d.paths, d.frames)):
        rows.setdefault(str(p), []).append((row, frame))
    side = CacheSpec.for_preprocessing(pre).side
    blank = torch.zeros(1, pre.in_chans, side, side, dtype=torch.uint16 if pre.bit_depth == 16 else torch.uint8)
    parts, out_names, skipped = [], [], {}
    for p, name in zip(split.paths, names):
        units = rows.get(str(p))
        if units is None:
            skipped[len(out_names)] = f"{p}: {bad.get(str(p), 'cannot be read')}"
            parts.append(blank)
            out_names.append(name)
            continue
        for row, frame in units:
            parts.append(d.split.images[row:row + 1])
            out_names.append(name if len(units) == 1 else f"{name}#frame{frame}")
    return Split(labels=torch.zeros(len(parts), dtype=torch.long), images=torch.cat(parts)), out_names, skipped


def decode_split(data: ImageData, name: str, pre: Preprocessing, *, strict: bool = False, cache: bool = True,
                 announce: bool = True) -> tuple[Split, list]:
    """Split ``name`` of ``data`` decoded once (through the cache) when it is files, with
    the files that could not be read: ``(split, [(split, path, reason), ...])``."""
    part = getattr(data, name)
    if part.in_memory or part.streamed:  # a stream is decoded as it is read
        return part, []
    only = dataclasses.replace(data, **({"train": None, "val": None, "test": None} | {name: part}))
    decoded = decode_data(only, pre, strict=strict, cache=cache, splits=(name,), announce=announce)
    return getattr(decoded.data, name), decoded.skipped


# ---------------------------------------------------------------------- training
@dataclass
class TrainSettings:
    """The data side of a training run (a subset of TrainConfig's keys)."""

    augment: str = "auto"
    hflip: bool | None = None
    randaugment: str | None = None
    balance: str = "auto"
    seed: int = 0
    strict: bool = False
    cache: bool = True
    workers: int | None = None
    shuffle_buffer: int = 1000  # streamed (sharded) data: samples each loader worker shuffles among


@dataclass
class TrainInputs:
    pre: Preprocessing  # what the batches were built for (the model trains and is saved with it)
    data: ImageData  # file splits replaced by decoded ones
    train: Batches
    val: Batches | None
    batch_augment: Any  # BatchAugment / BatchResizedCrop applied on the device, or None
    aug: AugmentSpec
    balance: BalancePlan
    files: DecodedData | None  # the decode pass over image files (None for in-memory data)


def _decode_for_training(data: ImageData, pre: Preprocessing, s: TrainSettings, progress: bool,
                         report_dir: Path | None, announce: bool) -> tuple[ImageData, DecodedData | None]:
    if data.train.in_memory:
        return data, None
    files = decode_data(data, pre, strict=s.strict, cache=s.cache, workers=s.workers, progress=progress,
                        report_dir=report_dir, announce=announce)
    empty = [c for c, n in zip(data.classes, files.data.train.class_counts(data.num_classes)) if n == 0]
    if empty:
        raise ImgclsError(f"class '{empty[0]}' has no readable training images",
                          "add images to it, or leave it out with --classes")
    return files.data, files


def training_inputs(data: ImageData, pre: Preprocessing, s: TrainSettings, batch_size: int, *,
                    device: torch.device, rank: int = 0, world: int = 1, progress: bool = False,
                    report_dir: Path | None = None, announce: bool = True) -> TrainInputs:
    """Training and validation batches of a run; ``batch_size`` is this process's."""
    if data.train.streamed:
        return _stream_inputs(_without_validation_note(data, announce), pre, s, batch_size, device=device,
                              rank=rank, world=world)
    unused = [str(p) for _, p, why in data.passed_over if why == UNUSED_FOLDER]
    if unused and announce:
        print(f"imgcls: not read: {', '.join(unused)} ({UNUSED_FOLDER.split('(', 1)[1]}", file=sys.stderr)
    data, files = _decode_for_training(data, pre, s, progress, report_dir, announce)
    aug = augment_preset(s.augment, data.kind, s.hflip)
    aug.randaugment = s.randaugment
    plan = plan_balance(data.train.labels, data.classes, s.balance)
    if (plan.mode != "none" or plan.ratio >= 3) and announce:
        print(f"imgcls: {plan.describe()}", file=sys.stderr)
    order = BalancedOrder(data.train.labels, s.seed) if plan.mode == "sampler" else None
    # photos from the decode cache: random resized crops per image in loader workers on a
    # CPU (in parallel with the training step), per batch on the device elsewhere
    photo_crop = files is not None and aug.preset == "photo"
    crop = BatchResizedCrop(pre.img_size, aug.scale, hflip=aug.hflip) if photo_crop else None
    in_workers = photo_crop and device.type == "cpu"
    pin = device.type == "cuda"
    # decoded-once photos are centre-cropped to the model input unless training crops them at random
    train = Batches(data.train, batch_size, shuffle=True, seed=s.seed, drop_last=True, pin_memory=pin, order=order,
                    transform=crop if in_workers else None, workers=s.workers,
                    center_crop=None if photo_crop else stored_crop(data.train, pre))
    val = eval_batches(data.val, pre, max(256, batch_size), workers=s.workers, device=device) \
        if data.val is not None else None
    if world > 1:  # each process reads its share (engine/distributed.py)
        train.shard(rank, world, even=True)
        if val is not None:
            val.shard(rank, world, even=False)
    if photo_crop:
        batch_aug = None if in_workers else crop
    else:
        if data.train.in_memory and aug.hflip:  # flips by the loader, alternating per epoch (airbench)
            aug.flip_order = "alternate"
            train.alternate_flips(s.seed)
        batch_aug = BatchAugment(aug.translate, aug.hflip and aug.flip_order != "alternate", s.randaugment) \
            if data.train.in_memory and (aug.preset != "none" or s.randaugment) else None
    return TrainInputs(pre=pre, data=data, train=train, val=val, batch_augment=batch_aug, aug=aug, balance=plan,
                       files=files)


@dataclass
class UnlabeledInputs:
    """The unlabelled pool of a FixMatch run (engine/consistency.py): its batches (uint8,
    shuffled, cycled by the trainer) and the weak and strong views of a batch."""

    batches: Batches
    weak: Any  # BatchAugment / BatchResizedCrop: the run's own augmentation, flips included
    strong: StrongAugment  # applied to a weak view: RandAugment / TrivialAugmentWide + Cutout


def unlabeled_inputs(pool: Split, pre: Preprocessing, aug: AugmentSpec, batch_size: int, *, seed: int = 0,
                     strong: str = "randaugment", cache: bool = True, workers: int | None = None,
                     rank: int = 0, world: int = 1, progress: bool = False) -> UnlabeledInputs:
    """Batches of the unlabelled pool through the same decode pass as training (files are
    decoded once, through the cache) with the run's augmentation as the weak view."""
    if not pool.in_memory:
        pool = decoded_split(pool, pre, cache=cache, workers=workers, progress=progress,
                             what="unlabelled images").split
    batches = Batches(pool, batch_size, shuffle=True, seed=seed + 7, drop_last=True)
    if world > 1:
        batches.shard(rank, world, even=True)
    photo = pre.resize == "shorter_side" and pool.images.shape[-1] > pre.img_size
    weak = BatchResizedCrop(pre.img_size, aug.scale, hflip=aug.hflip) if photo \
        else BatchAugment(aug.translate, aug.hflip)
    return UnlabeledInputs(batches=batches, weak=weak, strong=StrongAugment(strong))


# ---------------------------------------------------------------------- streamed (sharded) data
def stream_batches(split: Split, pre: Preprocessing, batch_size: int, *, train: bool = False, stored: bool = False,
                   seed: int = 0, shuffle_buffer: int = 1000, workers: int | None = None, pin: bool = False,
                   strict: bool = False, crop: Any = None) -> StreamBatches:
    """Batches of a split streamed from shards, decoded in loader workers. ``stored``: photos
    as the decode cache stores them (``img_size / crop_pct`` square, for random resized
    crops; ``crop``: run them in the loader workers); else as the model sees them at
    inference (``pil_transform``). Raw shards (decoded pixels, ``imgcls shard --resize``)
    are not decoded: their rows are the batch, resized only when stored at another size."""
    spec = CacheSpec.for_preprocessing(pre)
    photo = pre.resize == "shorter_side"
    tf = spec.transform() if stored else pre.pil_transform()
    exact = pre.img_size if pre.resize == "squash" and pre.bit_depth == 8 else None
    decode = BytesDecoder(tf, pre.in_chans, min_side=spec.side if photo else None, exact=exact)
    n = default_workers() if workers is None else workers
    # raw rows: at the cache's side (photos; centre-cropped to the model input at inference, as
    # cached rows are) or at the model input (squashed data)
    center = pre.img_size if photo and not stored else None
    return StreamBatches(split, batch_size, decode, shuffle=train, seed=seed, shuffle_buffer=shuffle_buffer,
                         workers=n, pin_memory=pin, strict=strict, size=spec.side, channels=pre.in_chans,
                         crop=crop, center=center)


def _without_validation_note(data: ImageData, announce: bool) -> ImageData:
    """A shard set without a val split gets no hold-out (a stream has no random access to
    draw a stratified sample from): said once at the start of training, and its note kept once
    (load_data, run on the same data by each step of a run, adds it each time)."""
    if data.val is None and announce:
        print(f"imgcls: {data.train.shards.where} has no validation split, and none is held out of a streamed "
              "shard set: the run reports training accuracy (`imgcls shard --val-split` writes val shards)",
              file=sys.stderr)
    return dataclasses.replace(data, notes=list(dict.fromkeys(data.notes)))


def _stream_inputs(data: ImageData, pre: Preprocessing, s: TrainSettings, batch_size: int, *,
                   device: torch.device, rank: int, world: int) -> TrainInputs:
    """:func:`training_inputs` for a shard set: the same augmentation and normalisation;
    alternating flips by sample id (the shard's place in the index and the sample's in it)."""
    aug = augment_preset(s.augment, data.kind, s.hflip)
    aug.randaugment = s.randaugment
    plan = plan_balance(data.train.labels, data.classes, s.balance)
    if plan.mode == "sampler":
        raise ImgclsError("--balance sampler needs random access, which streamed shards do not have",
                          "use --balance weights (a weighted loss) with shards")
    photo = aug.preset == "photo" and data.native_size is None
    crop = BatchResizedCrop(pre.img_size, aug.scale, hflip=aug.hflip) if photo else None
    pin = device.type == "cuda"
    # as from the decode cache: random resized crops in the loader workers on a CPU (in
    # parallel with the training step), per batch on the device elsewhere
    in_workers = photo and device.type == "cpu" and (s.workers is None or s.workers > 0)
    train = stream_batches(data.train, pre, batch_size, train=True, stored=photo, seed=s.seed,
                           shuffle_buffer=s.shuffle_buffer, workers=s.workers, pin=pin, strict=s.strict,
                           crop=crop if in_workers else None)
    val = stream_batches(data.val, pre, max(256, batch_size), workers=s.workers, pin=pin, strict=s.strict) \
        if data.val is not None else None
    train.shard(rank, world, even=True)
    if val is not None:
        val.shard(rank, world, even=False)
    if not photo and aug.hflip:  # flips alternating per epoch, by sample id, as for in-memory data (airbench)
        aug.flip_order = "alternate"
        train.alternate_flips(s.seed)
    batch_aug = (None if in_workers else crop) if photo else \
        BatchAugment(aug.translate, aug.hflip and aug.flip_order != "alternate", s.randaugment) \
        if aug.preset != "none" or s.randaugment else None
    return TrainInputs(pre=pre, data=data, train=train, val=val, batch_augment=batch_aug, aug=aug, balance=plan,
                       files=None)


def prediction_split(images: Any, pre: Preprocessing) -> tuple[Split, list[str]]:
    """:func:`as_split`, and also a shard set or a manifest (one path): every split of it,
    in the order train, val, test (a shard set's source names come with its stream)."""
    from imgcls.data.manifest import MANIFEST_SUFFIXES
    from imgcls.data.shardset import ShardSplit, is_shard_spec

    one = images[0] if isinstance(images, (list, tuple)) and len(images) == 1 else images
    if not isinstance(one, (str, Path)) or not (is_shard_spec(one) or Path(str(one)).suffix.lower() in
                                                 MANIFEST_SUFFIXES and Path(str(one)).is_file()):
        return as_split(images, pre)
    data = load_data(one, val_split=0.0)
    parts = [s for s in (data.train, data.val, data.test) if s is not None]
    labels = torch.cat([s.labels for s in parts])
    if all(s.streamed for s in parts):
        return Split(labels=labels, shards=ShardSplit.joined([s.shards for s in parts])), []
    paths = [p for s in parts for p in s.paths]
    return Split(labels=labels, paths=paths), [str(p) for p in paths]
