"""Before training: decode every file split once (through the cache) and account for
the files that cannot be used.

Unreadable files (empty, truncated, not an image, too many pixels, missing, no
permission) are found here, before the first epoch, never in the middle of one. By
default they are skipped and reported (one line on stderr, every file in
``<run>/skipped.csv``); ``strict=True`` (``--strict``) makes any of them an error.
"""

from __future__ import annotations

import csv
import dataclasses
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from imgcls.data.cache import decoded_split
from imgcls.data.records import ImageData
from imgcls.data.transforms import Preprocessing
from imgcls.errors import ImgclsError

SPLITS = ("train", "val", "test")


@dataclass
class DecodedData:
    data: ImageData  # file splits replaced by decoded (memory-mapped) ones
    total_files: int = 0
    decoded_now: int = 0  # decoded in this call; the rest came from the cache
    skipped: list[tuple[str, Path, str]] = field(default_factory=list)  # (split, file, reason)
    csv_path: Path | None = None  # where the skipped files are listed

    def summary(self, csv_path: Path | None = None) -> str:
        """``skipped 3 of 398 files: 2 truncated or corrupt, 1 empty file (see runs/x/skipped.csv)``."""
        kinds = Counter(reason.split(" (")[0] for _, _, reason in self.skipped)
        text = (f"skipped {len(self.skipped)} of {self.total_files} files: "
                + ", ".join(f"{n} {k}" for k, n in kinds.most_common()))
        if csv_path is not None:
            return text + f" (see {csv_path})"
        first = self.skipped[0]
        return text + f"; first: {first[1]}"

    def to_dict(self, csv_path: Path | None = None) -> dict:
        return {"files": self.total_files, "skipped": len(self.skipped), "decoded_now": self.decoded_now,
                "skipped_list": str(csv_path) if csv_path else
                [{"split": s, "path": str(p), "reason": r} for s, p, r in self.skipped[:50]]}


def write_skipped_csv(path: Path, skipped: list[tuple[str, Path, str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "path", "reason"])
        w.writerows((s, str(p), r) for s, p, r in skipped)


def decode_data(data: ImageData, pre: Preprocessing, *, strict: bool = False, cache: bool = True,
                workers: int | None = None, progress: bool = False, report_dir: Path | None = None,
                splits: tuple[str, ...] = SPLITS, announce: bool = True) -> DecodedData:
    """Decode the file splits of ``data`` named in ``splits``; returns a copy of ``data``
    whose splits are in-memory uint8 tensors (``img_size / crop_pct`` square).

    Skipped files are written to ``report_dir/skipped.csv`` and announced in one line on
    stderr (``announce``); with ``strict`` they raise ImgclsError instead."""
    decoded = DecodedData(data=data)
    replaced = {}
    for name in splits:
        split = getattr(data, name)
        if split is None or split.in_memory:
            continue
        d = decoded_split(split, pre, cache=cache, workers=workers, progress=progress, what=f"{name} images")
        replaced[name] = d.split
        decoded.total_files += len(split)
        decoded.decoded_now += d.decoded
        decoded.skipped += [(name, p, why) for p, why in d.skipped]
    csv_path = None
    if decoded.skipped:
        if report_dir is not None:
            csv_path = Path(report_dir) / "skipped.csv"
            write_skipped_csv(csv_path, decoded.skipped)
        if strict:
            split, path, why = decoded.skipped[0]
            raise ImgclsError(
                f"{len(decoded.skipped)} of {decoded.total_files} files cannot be used, e.g. {path}: {why}",
                f"fix or remove them{f' (all listed in {csv_path})' if csv_path else ''}, "
                "or drop --strict to skip them")
        if announce:
            print(f"imgcls: {decoded.summary(csv_path)}", file=sys.stderr)
    train = replaced.get("train", data.train)
    if train is not None and not len(train):
        raise ImgclsError("none of the training images could be read", "run `imgcls audit DATA` to see why")
    decoded.data = dataclasses.replace(data, notes=list(data.notes), **replaced)
    decoded.csv_path = csv_path
    return decoded
