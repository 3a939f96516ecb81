"""imgcls cache [--prune | --clear] [--json]: the decode-once cache of image files."""

from __future__ import annotations

import argparse
import json

NAME = "cache"
HELP = "show the decode cache (decoded image files); --prune drops rows of changed/deleted files, --clear empties it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prune", action="store_true",
                   help="keep only images of files that still exist unchanged; delete older cache formats")
    g.add_argument("--clear", action="store_true", help="delete the whole cache folder (the next run decodes again); "
                   "--prune and --clear refuse a folder without imgcls's CACHEDIR.TAG marker")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--dir", default=None, help="cache folder (default: $IMGCLS_DECODE_CACHE_DIR, "
                                               "else $IMGCLS_CACHE_DIR/decoded, else ~/.cache/imgcls/decoded)")


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def run(args: argparse.Namespace) -> int:
    from imgcls.data.cache import cache_report, cache_root, clear_cache, prune_cache

    root = cache_root(args.dir)
    if args.dir and not root.is_dir():  # a typo is not an empty cache
        from imgcls.errors import ImgclsError

        raise ImgclsError(f"--dir {root} {'is not a folder' if root.exists() else 'does not exist'}",
                          "give the cache folder (imgcls cache without --dir shows the default one)")
    if args.clear:
        result = {"cache": str(root), "freed_bytes": clear_cache(root)}
        print(json.dumps(result) if args.json else f"cleared {root}: freed {_mb(result['freed_bytes'])}")
        return 0
    if args.prune:
        result = {"cache": str(root), **prune_cache(root)}
        print(json.dumps(result) if args.json else
              f"pruned {root}: kept {result['kept_rows']} images, dropped {result['dropped_rows']}, "
              f"freed {_mb(result['freed_bytes'])}")
        return 0
    entries = cache_report(root, check_files=True)
    if args.json:
        print(json.dumps({"cache": str(root), "entries": entries}, indent=2))
        return 0
    if not entries:
        print(f"{root}: empty")
        return 0
    print(f"{root}:")
    for e in entries:
        if not e["cache_folder"]:
            print(f"  {e['key']}: not a cache folder (left alone)")
            continue
        if not e["current_format"]:
            print(f"  {e['key']}: {_mb(e['bytes'])}, an older cache format (imgcls cache --prune deletes it)")
            continue
        stale = f", {e['stale_rows']} of changed or deleted files (--prune drops them)" if e["stale_rows"] else ""
        print(f"  {e['key']}: {e['rows']} images, {_mb(e['bytes'])}{stale}")
    return 0
