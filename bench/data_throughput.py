"""Data-pipeline throughput on a photo folder: torchvision ImageFolder + DataLoader
(decode + RandomResizedCrop + flip + ToTensor + Normalize in worker processes, every
epoch) against imgcls (decode once into the cache, then crop/flip/normalise whole
batches of cached uint8 tensors). Measured side by side, A B A B, in one process tree;
prints JSON (images/s per epoch and the ratios).

    flock /tmp/imgcls-heavy.lock python bench/data_throughput.py \
        --data ../shared/data/hymenoptera --size 224 --epochs 3 --rounds 2

"Epoch" here is a full pass over the data producing normalised float batches ready for
the model (no model): the data side of a training epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader
from torchvision import datasets
from torchvision import transforms as T

from imgcls.data.cache import decoded_split
from imgcls.data.loaders import Batches
from imgcls.data.records import Split
from imgcls.data.sources import from_folder
from imgcls.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BatchResizedCrop, Preprocessing
from imgcls.engine.threads import tune_cpu_allocator

SCALE = (0.25, 1.0)  # imgcls' photo preset; the baseline uses the same


def baseline(root: Path, size: int, epochs: int, batch: int, workers: int) -> list[float]:
    tf = T.Compose([T.RandomResizedCrop(size, scale=SCALE), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    parts = [datasets.ImageFolder(str(d), transform=tf) for d in sorted(root.iterdir()) if d.is_dir()]
    ds = ConcatDataset(parts)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                        prefetch_factor=4 if workers else None)
    rates = []
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for _x, y in loader:
            n += len(y)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def imgcls_pipeline(root: Path, size: int, epochs: int, batch: int, workers: int | None,
                    cache_root: Path, normalize: bool = True, mode: str = "workers") -> tuple[list[float], float]:
    pre = Preprocessing(img_size=size, in_chans=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        resize="shorter_side", crop_pct=0.875)
    aug = BatchResizedCrop(size, SCALE, hflip=True)
    gen = torch.Generator().manual_seed(0)
    data = from_folder(root)
    rates = []
    t_first = time.perf_counter()
    splits = [decoded_split(s, pre, cache_root=cache_root, workers=workers).split
              for s in (data.train, data.val, data.test) if s is not None]
    decode_s = time.perf_counter() - t_first
    images = torch.cat([s.images for s in splits]) if len(splits) > 1 else splits[0].images
    labels = torch.cat([s.labels for s in splits])

    # what Classifier.fit does on a CPU: random resized crops of the cached uint8 images, a batch
    # per call, in `workers` loader processes; the main process normalises (channels_last), as the
    # trainer does
    loader = Batches(Split(labels=labels, images=images), batch, shuffle=True, seed=0, drop_last=False,
                     transform=aug if mode == "workers" else None, workers=workers)
    for e in range(epochs):
        loader.set_epoch(e)
        t0, n = time.perf_counter(), 0
        for x, y in loader:
            if mode == "batch":  # the accelerator path (BatchResizedCrop), here on the CPU
                x = aug(x, gen)
            if normalize:
                x = pre.normalize(x, channels_last=True)
            n += len(y)
        dt = time.perf_counter() - t0 + (decode_s if e == 0 else 0.0)
        rates.append(n / dt)
    return rates, decode_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/hymenoptera")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="leave glibc's allocator as it is (imgcls' trainer tunes it on CPUs)")
    args = ap.parse_args()
    root = Path(args.data)
    # for both pipelines alike (this process and the baseline's forked workers): what fit does on a CPU
    malloc_tuned = False if args.no_malloc_tuning else tune_cpu_allocator()
    runs = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache:
            base = baseline(root, args.size, args.epochs, args.batch, args.workers)
            cold, decode_s = imgcls_pipeline(root, args.size, args.epochs, args.batch, args.workers, Path(cache))
            warm, _ = imgcls_pipeline(root, args.size, 1, args.batch, args.workers, Path(cache))  # a later run
            raw, _ = imgcls_pipeline(root, args.size, 2, args.batch, args.workers, Path(cache), normalize=False)
            batched, _ = imgcls_pipeline(root, args.size, 2, args.batch, args.workers, Path(cache), mode="batch")
        runs.append({"round": r, "baseline_img_s": [round(v, 1) for v in base],
                     "imgcls_img_s": [round(v, 1) for v in cold], "imgcls_decode_pass_s": round(decode_s, 2),
                     "imgcls_next_run_first_epoch_img_s": round(warm[0], 1),
                     "imgcls_uint8_no_normalize_img_s": round(raw[1], 1),
                     "imgcls_batch_crop_in_main_img_s": round(batched[1], 1)})
    b_first = statistics.median(r["baseline_img_s"][0] for r in runs)
    b_later = statistics.median(v for r in runs for v in r["baseline_img_s"][1:])
    i_first = statistics.median(r["imgcls_img_s"][0] for r in runs)
    i_later = statistics.median(v for r in runs for v in r["imgcls_img_s"][1:])
    print(json.dumps({
        "bench": "data_throughput", "data": str(root), "size": args.size, "batch": args.batch,
        "workers": args.workers, "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "malloc_tuning": malloc_tuned, "load_avg_1min": round(os.getloadavg()[0], 2),
        "runs": runs,
        "median_img_s": {"baseline_first": round(b_first, 1), "baseline_later": round(b_later, 1),
                         "imgcls_first": round(i_first, 1), "imgcls_later": round(i_later, 1)},
        "ratio_first_epoch": round(i_first / b_first, 2), "ratio_later_epochs": round(i_later / b_later, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
