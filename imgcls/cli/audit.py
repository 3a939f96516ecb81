"""imgcls audit: a data set health check before training (exit 0 clean, 1 problems)."""

from __future__ import annotations

import argparse
import json
import os
import sys

NAME = "audit"
HELP = "check an image data set: counts, unreadable files, duplicates, leakage, outliers"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="folder of class folders (optionally in train/val/test), "
                                                "a CSV/TSV manifest, a Keras-style .npz or a data set name")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--classes", help="comma-separated class names (fixes the class list and order)")
    p.add_argument("--no-pixels", dest="pixels", action="store_false",
                   help="headers and content hashes only: faster, but no corrupt-data, near-duplicate "
                        "or constant-image checks")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.add_argument("--group-by", metavar="COLUMN|REGEX", help="report groups (a manifest column, or the first "
                   "capture group of a regex on the file path) with images in more than one split")
    p.add_argument("--labels", nargs="?", const="", metavar="ISSUES.csv",
                   help="include label issues: the summary of an imgcls label-issues CSV, or (no value) run "
                        "label-issues with its defaults first (writes issues.csv + issues.html here)")
    p.add_argument("--max-listed", type=int, default=10, help="files listed per finding in the table")


def run(args: argparse.Namespace) -> int:
    from imgcls.data.audit import audit
    from imgcls.data.sources import load_data

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    data = load_data(args.data, val_split=0.0, classes=classes)
    given = None
    if args.labels:  # checked against the data before the audit's pass over every image
        from imgcls.curation.label_issues import read_summary

        given = read_summary(args.labels, data)
    report = audit(data, pixels=args.pixels, workers=args.workers, group_by=args.group_by)
    if args.labels is not None:
        add_label_issues(report, args, given)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, args.max_listed)
    sys.stdout.flush()
    return 0 if report["clean"] else 1


def add_label_issues(report: dict, args: argparse.Namespace, given: dict | None = None) -> None:
    """The label-issue summary (imgcls label-issues) as a section and one warning finding:
    ``given``, the summary of the CSV named by --labels, else label-issues runs here."""
    from imgcls.curation.label_issues import find_issues

    if given is not None:
        s = given
    else:
        from imgcls.config import TrainConfig

        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        s = find_issues(TrainConfig(data=args.data, classes=classes), out="issues.csv", progress=not args.json)
    report["label_issues"] = s
    if s["issues"]:
        report["findings"].append({"kind": "label_issues", "severity": "warning",
                                   "message": f"{s['issues']} training label(s) look wrong (cleanlab), "
                                              f"most suspicious first in {s['csv']}",
                                   "files": [r.get("path") or f"train[{r['index']}]" for r in s["top"]]})
        report["summary"]["label_issues"] = s["issues"]
        report["clean"] = False


def print_report(r: dict, max_listed: int = 10) -> None:
    from rich.console import Console
    from rich.table import Table

    from imgcls.data.sources import UNUSED_FOLDER

    con = Console()
    what = f"images in arrays, shape {'x'.join(map(str, r['shape']))} (C x H x W)" if r.get("shape") else "files"
    con.print(f"[bold]{r['data']}[/bold]: {r['files']} {what}, {r['readable']} readable, "
              f"class imbalance {r['imbalance_ratio']}:1 (train)")
    counts = Table()
    counts.add_column("class")
    splits = list(r["counts"])
    for s in splits:
        counts.add_column(s, justify="right")
    for c in r["classes"]:
        counts.add_row(c, *(str(r["counts"][s].get(c, 0)) for s in splits))
    con.print(counts)
    con.print("formats: " + ", ".join(f"{k} {v}" for k, v in r["formats"].items())
              + " | modes: " + ", ".join(f"{k} {v}" for k, v in r["modes"].items()))
    con.print("shorter side (px): " + ", ".join(f"{k}: {v}" for k, v in r["shorter_side"].items()))
    unused = [f["path"] for f in r.get("passed_over_files", []) if f["why"] == UNUSED_FOLDER]
    if unused:
        con.print(f"not read: {', '.join(unused)} ({UNUSED_FOLDER.split('(', 1)[1]}", soft_wrap=True)
    over = {k: v for k, v in (r.get("passed_over") or {}).items() if k != UNUSED_FOLDER}
    if over:
        con.print("passed over (not images): " + ", ".join(f"{v} {k}{'s' if v > 1 else ''}" for k, v in over.items()))
    if r.get("label_issues") is not None:
        li = r["label_issues"]
        per = ", ".join(f"{k} {v}" for k, v in li["issues_per_given_class"].items() if int(v))
        con.print(f"label issues: {li['issues']} training label(s) look wrong" + (f" (given: {per})" if per else "")
                  + f" - {li['csv']}")
    if r["clean"]:
        con.print("[green]clean: no problems found[/green]")
        return
    root = r.get("root") or ""
    t = Table(title=f"{len(r['findings'])} finding(s)" + (f", paths relative to {root}" if root else ""))
    for col in ("severity", "kind", "what", "files"):
        t.add_column(col, overflow="fold")
    for f in sorted(r["findings"], key=lambda f: (f["severity"] != "error", f["kind"])):
        files = [os.path.relpath(p, root) if root else p for p in f["files"][:max_listed]]
        files = files[:max_listed] + ([f"... {len(f['files']) - max_listed} more"]
                                           if len(f["files"]) > max_listed else [])
        style = "red" if f["severity"] == "error" else "yellow"
        t.add_row(f"[{style}]{f['severity']}[/{style}]", f["kind"], f["message"], "\n".join(files))
    con.print(t)
    con.print("summary: " + ", ".join(f"{k} {v}" for k, v in r["summary"].items()))
