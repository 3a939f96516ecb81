"""imgcls shard DATA --out DIR [--shard-size 512MB] [--resize S] [--format webdataset|parquet]
[--encoding encoded|raw]"""

from __future__ import annotations

import argparse

NAME = "shard"
HELP = "write a data set as WebDataset tar shards or Parquet files with an index.json, for streaming training"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="any data imgcls reads: class folders, a manifest, an .npz, a dataset name")
    p.add_argument("--out", required=True, help="folder to write the shards and index.json to")
    p.add_argument("--shard-size", default="512MB", help="bytes per shard, e.g. 512MB, 1GB, 64MiB (default: 512MB)")
    p.add_argument("--resize", type=int, default=None, metavar="S",
                   help="shorter side at most S pixels; stored as raw pixels, S x S centre squares for files "
                        "(give the decode cache's side: img_size / 0.875), unless --encoding encoded "
                        "(default: bytes as they are)")
    p.add_argument("--format", choices=["webdataset", "parquet"], default="webdataset")
    p.add_argument("--encoding", choices=["encoded", "raw"], default=None,
                   help="encoded: image bytes (PNG/JPEG; smallest); raw: decoded uint8 pixels, as the decode cache "
                        "stores them (no decoding while training; default with --resize)")
    p.add_argument("--val-split", type=float, default=0.1,
                   help="hold out this stratified fraction of train as val/ shards when the data has no val split")
    p.add_argument("--seed", type=int, default=0, help="seed of the hold-out and of the shuffle before sharding")
    p.add_argument("--classes", default=None, help="comma-separated class names: fixes the class list and order")
    p.add_argument("--workers", type=int, default=None, help="image-decoding processes")
    p.add_argument("--overwrite", action="store_true", help="replace the shard set already in --out")


def check_out(out: str) -> None:
    """--out must be (or be creatable as) a folder: checked before any image is read."""
    from pathlib import Path

    from imgcls.errors import ImgclsError

    for p in (Path(out), *Path(out).parents):
        if p.exists():
            if not p.is_dir():
                raise ImgclsError(f"--out {out}: {p} is a file, not a folder",
                                  "give a folder (new or empty) for the shards and index.json")
            return


def run(args: argparse.Namespace) -> int:
    from imgcls.data.shard_writer import parse_size, write_shards
    from imgcls.data.sources import load_data

    check_out(args.out)
    size = parse_size(args.shard_size)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    data = load_data(args.data, val_split=args.val_split, seed=args.seed, classes=classes)
    index = write_shards(data, args.out, fmt=args.format, shard_size=size, resize=args.resize,
                         workers=args.workers, seed=args.seed, overwrite=args.overwrite, source=str(args.data),
                         encoding=args.encoding)
    parts = ", ".join(f"{name} {s['count']} images in {len(s['shards'])} shard(s)" for name, s in index["splits"].items())
    from pathlib import Path

    from imgcls.data.shardset import INDEX_NAME

    print(f"wrote {args.out}: {parts} ({index['format']}; index: {Path(args.out) / INDEX_NAME})")
    return 0
