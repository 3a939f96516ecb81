"""imgcls predict RUN IMAGE_OR_FOLDER... [--backend auto|torch|onnx] [--output FILE.csv|json]"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

NAME = "predict"
HELP = "predict the class of images (files or folders), on the fastest available backend"
FORMATS = ("text", "csv", "json", "jsonl")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by `imgcls train`")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=1, help="how many classes to show per image")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"],
                   help="auto: ONNX Runtime on a CPU when the run has an up-to-date `imgcls export`, else torch")
    p.add_argument("--int8", action="store_true", help="run the int8 export (model.int8.onnx)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="output format (default: from --output's extension, else text)")
    p.add_argument("--output", "-o", default=None, help="write the predictions to this file (.csv, .json, .jsonl)")
    p.add_argument("--json", action="store_true", help="same as --format jsonl: one JSON object per image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None, help="image-decoding processes")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image (default: skip it, say why in its output row)")
    p.add_argument("--devices", type=int, default=1,
                   help="processes on this machine (torchrun): SOURCE is split over them, one part file each in "
                        "--output DIR/ (also under torchrun, multi-node)")
    p.add_argument("--part-format", choices=["parquet", "jsonl"], default="parquet",
                   help="part files of --output DIR/ (default: parquet)")
    p.add_argument("--sets", action=argparse.BooleanOptionalAction, default=None,
                   help="conformal prediction sets (default: when the model has them; --sets: require them)")
    p.add_argument("--reject-unknown", action=argparse.BooleanOptionalAction, default=None,
                   help="answer 'unknown' above the OOD threshold (default: when the model has one; "
                        "--reject-unknown: require it)")


def _format(args: argparse.Namespace) -> str:
    from imgcls.errors import ImgclsError

    if args.json:
        return "jsonl"
    if args.format:
        return args.format
    if args.output:
        ext = Path(args.output).suffix.lower().lstrip(".")
        if ext in ("csv", "json", "jsonl"):
            return ext
        raise ImgclsError(f"cannot tell the format of --output {args.output}",
                          "use a .csv, .json or .jsonl name, or pass --format")
    return "text"


def render(preds, fmt: str, top_k: int) -> str:
    if fmt == "json":
        return "[\n" + ",\n".join(json.dumps(p.to_dict()) for p in preds) + "\n]\n"  # one image a line
    if fmt == "jsonl":
        return "".join(json.dumps(p.to_dict()) + "\n" for p in preds)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        k = max((len(p.top) for p in preds), default=top_k)
        errors = any(p.error for p in preds)  # an error column only when some image could not be read
        multi = any(p.labels is not None for p in preds)  # multi-label: the label set and its probabilities
        trust = _trust_columns(preds)
        w.writerow(["source", "label", "probability"]
                   + [f"{col}_{i}" for i in range(2, k + 1) for col in ("class", "probability")]
                   + (["labels", "labels_p"] if multi else []) + trust + (["error"] if errors else []))
        for p in preds:
            cells = [v for c, prob in p.top for v in (c, f"{prob:.6f}")] or [""] * (2 * k)
            if p.top:
                cells[0] = p.label  # "unknown" when rejected; the guess has its own column
            sets = [";".join(c for c, _ in p.labels or []), ";".join(f"{q:.6f}" for _, q in p.labels or [])]
            w.writerow([p.source] + cells + (sets if multi else []) + _trust_cells(p, trust)
                       + ([p.error or ""] if errors else []))
        return buf.getvalue()
    return "".join(f"{p.source}: " + (_text(p) if not p.error else f"skipped: {p.error}") + "\n" for p in preds)


def _text(p) -> str:
    """``cat 0.9120  dog 0.0500`` (multi-label: ``labels cat 0.97, dog 0.81``) [``  set {cat, dog}``]
    [``  ood 3.1``]; rejected: ``unknown (guess: cat 0.41 ...)``."""
    top = "  ".join(f"{c} {prob:.4f}" for c, prob in p.top)
    if p.labels is not None:  # multi-label: the labels above their thresholds
        text = ("labels " + ", ".join(f"{c} {prob:.4f}" for c, prob in p.labels) if p.labels
                else f"no label above its threshold (top: {top})")
        text = f"unknown (guess: {text})" if p.unknown else text
    else:
        text = f"unknown (guess: {top})" if p.unknown else top
    if p.set is not None:
        text += "  set {" + ", ".join(p.set) + "}"
    if p.ood_score is not None:
        text += f"  ood {p.ood_score:.4g}"
    return text


def _trust_columns(preds) -> list[str]:
    """The trust columns some prediction has: guess, unknown, ood_score, set (';'-separated)."""
    cols = []
    if any(p.unknown is not None for p in preds):
        cols += ["guess", "unknown"]
    if any(p.ood_score is not None for p in preds):
        cols.append("ood_score")
    if any(p.set is not None for p in preds):
        cols.append("set")
    return cols


def _trust_cells(p, cols: list[str]) -> list[str]:
    values = {"guess": p.guess or "", "unknown": "" if p.unknown is None else str(p.unknown).lower(),
              "ood_score": "" if p.ood_score is None else f"{p.ood_score:.6g}",
              "set": "" if p.set is None else ";".join(p.set)}
    return [values[c] for c in cols]


def run(args: argparse.Namespace) -> int:
    from imgcls.api import Classifier
    from imgcls.errors import ImgclsError

    if args.batch_size < 1:
        raise ImgclsError(f"--batch-size {args.batch_size} is not positive", "e.g. --batch-size 64")
    if args.top_k < 1:  # before the model loads (Classifier.predict refuses it too, naming top_k)
        raise ImgclsError(f"--top-k {args.top_k} is below 1", "e.g. --top-k 1 for the best class, 3 for three")
    from imgcls.cli.predict_parts import parts_mode, run_parts

    if parts_mode(args):
        return run_parts(args)
    fmt = _format(args)
    clf = Classifier.load(args.run)
    if args.int8 and args.backend == "torch":
        raise ImgclsError("--int8 runs the int8 ONNX export", "drop --backend torch")
    backend = "onnx-int8" if args.int8 else args.backend
    preds = clf.predict(args.images, top_k=args.top_k, batch_size=args.batch_size, device=args.device,
                        workers=args.workers, progress=True, backend=backend, strict=args.strict, sets=args.sets,
                        reject_unknown=args.reject_unknown)
    bad = [p for p in preds if p.error]
    if bad and len(bad) == len(preds):
        raise ImgclsError(f"none of the {len(preds)} images could be read (first: {bad[0].error})",
                          "check the files, e.g. with imgcls audit")
    if bad:
        print(f"imgcls: skipped {len(bad)} of {len(preds)} images that could not be read (first: {bad[0].error}); "
              "their rows say why (--strict: stop instead)", file=sys.stderr)
    text = render(preds, fmt, args.top_k)
    if args.output:
        try:  # a file name that is not valid UTF-8 is written as its own bytes (JSON escapes it: \udcff)
            Path(args.output).write_text(text, encoding="utf-8", errors="surrogateescape")
        except OSError as exc:
            raise ImgclsError(f"cannot write {args.output}: {exc.strerror}", "choose another --output") from None
        print(f"wrote {len(preds)} predictions to {args.output}", file=sys.stderr)
    else:
        _to_stdout(text)
    return 0


def _to_stdout(text: str) -> None:
    """``text`` on stdout; file names that are not valid UTF-8 (surrogate escapes) as their own
    bytes, also where stdout's encoding is strict (a UTF-8 locale other than C.UTF-8)."""
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:  # raised while encoding, before anything was written
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode(sys.stdout.encoding or "utf-8", "surrogateescape"))
        sys.stdout.buffer.flush()

