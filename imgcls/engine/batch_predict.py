"""Batch prediction over many processes: ``imgcls predict RUN SOURCE --devices N --output DIR/``
(or the same command under torchrun, on several nodes).

Each process (RANK of WORLD_SIZE, from torchrun's environment) takes its part of SOURCE -
a contiguous block of a folder's or manifest's files, or its own shards of a shard set
(data/shardset.py: ``assign``) - runs it through the one :class:`Predictor` batch by batch
(``Predictor.stream``: nothing is accumulated, memory stays flat) and writes one part file,
``part-RRRRR-of-WWWWW.parquet`` (or ``.jsonl``). The processes never talk to each other, so
none can wait on another.

Resumable: a finished part is skipped when the command runs again. A JSONL part is appended
and flushed per batch and continues after its last complete row (a killed job loses at most
one batch per rank); a Parquet part is written to ``*.partial`` and renamed when complete (a
killed Parquet part is redone). Rank 0 shows the whole job's progress, from the per-rank
counts each process writes to ``DIR/.progress/``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcls.bundle import ModelBundle
from imgcls.data.records import Split
from imgcls.engine.decisions import Prediction, decide
from imgcls.engine.predictor import Predictor
from imgcls.engine.trust import Trust
from imgcls.errors import ImgclsError

FORMATS = ("parquet", "jsonl")


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))


def record(pred: Prediction, fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """One prediction row, as every part file holds it, from the one decision rule
    (engine/decisions.py); ``fields``: the model's extra columns (multi-label ``labels``;
    ``ood_score``, ``unknown``, ``guess``, ``set``), the same keys in every row."""
    d = pred.to_dict()
    row = {"source": pred.source, "label": pred.label, "top_classes": [c for c, _ in pred.top],
           "top_probabilities": [round(p, 6) for _, p in pred.top],
           "probabilities": [round(float(p), 6) for p in pred.probabilities], "error": pred.error}
    return {**row, **{f: d.get(f) for f in fields}}


def record_fields(bundle, p: Predictor) -> tuple[str, ...]:
    """The extra columns this model's predictions carry (see :func:`record`)."""
    t = p.trust
    return (("labels",) if bundle.multi_label else ()) + ("ood_score",) \
        + (("unknown", "guess") if t.threshold is not None else ()) + (("set",) if t.conformal else ())


def my_part(split: Split, names: list[str], r: Ranks) -> tuple[Split, list[str]]:
    """This rank's share of files: a contiguous block (a shard set is shared out by its
    stream, ``StreamBatches.shard``: each rank reads its own shards)."""
    if split.streamed or r.world == 1:
        return split, names
    import torch

    n = len(split)
    lo, hi = n * r.rank // r.world, n * (r.rank + 1) // r.world
    return split.subset(torch.arange(lo, hi)), names[lo:hi]


class _Progress:
    """Rank 0's bar over the whole job: every rank writes its count to DIR/.progress/rank-R."""

    def __init__(self, out: Path, r: Ranks, total: int, show: bool):
        self.path = out / ".progress" / f"rank-{r.rank}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.r, self.total, self.done, self.last = r, total, 0, 0.0
        self.bar = None
        if show and r.rank == 0 and total:
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task(f"predicting ({r.world} process{'es' if r.world > 1 else ''})", total=total)

    def advance(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if not force and now - self.last < 1.0:
            return
        self.last = now
        self.path.write_text(str(self.done))
        if self.bar is not None:
            counts = [int(p.read_text() or 0) for p in self.path.parent.glob("rank-*") if p.read_text().strip()]
            self.bar.update(self.task, completed=sum(counts))

    def close(self, parts: list[Path] = ()) -> None:
        """Write the final count; rank 0 follows the others until their ``parts`` exist."""
        self.advance(0, force=True)
        if self.bar is None:
            return
        deadline = time.monotonic() + 24 * 3600
        while not all(p.exists() for p in parts) and time.monotonic() < deadline:
            time.sleep(1.0)
            self.advance(0, force=True)
        self.advance(0, force=True)
        self.bar.stop()


class _PartWriter:
    """One rank's part file: JSONL appended per batch, or Parquet row groups (pyarrow)."""

    def __init__(self, out: Path, r: Ranks, fmt: str):
        self.fmt = fmt
        self.final = out / part_name(r.rank, r.world, fmt)
        self.tmp = self.final.with_name(self.final.name + ".partial")
        self.done_rows, self.writer, self.f = 0, None, None
        if fmt == "jsonl" and self.tmp.exists():  # continue after the last complete row
            lines = self.tmp.read_bytes().split(b"\n")
            good = lines[:-1]  # the last piece lacks its newline: an incomplete row, or empty
            self.tmp.write_bytes(b"".join(line + b"\n" for line in good))
            self.done_rows = len(good)
        if fmt == "jsonl":
            self.f = open(self.tmp, "a")

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        if self.fmt == "jsonl":
            self.f.write("".join(json.dumps(row) + "\n" for row in rows))
            self.f.flush()
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows, schema=_schema(tuple(rows[0])))
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, table.schema)
        self.writer.write_table(table)

    def finish(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.fmt == "parquet":
            if self.writer is None:
                self.write_empty()
            else:
                self.writer.close()
        self.tmp.replace(self.final)

    def discard(self) -> None:
        """Drop the unfinished part (nothing in it is worth keeping): a rerun starts it afresh."""
        if self.f is not None:
            self.f.close()
        if self.writer is not None:
            self.writer.close()
        self.tmp.unlink(missing_ok=True)

    def write_empty(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([], schema=_schema()), self.tmp)


def _schema(keys: tuple[str, ...] = ()):
    """The part file's columns: the base ones and the model's extra fields among ``keys``
    (:func:`record_fields`: multi-label ``labels``, ``ood_score``, ``unknown``, ``guess``, ``set``)."""
    import pyarrow as pa

    extra = {"labels": pa.list_(pa.struct([("label", pa.string()), ("p", pa.float32())])),
             "ood_score": pa.float64(), "unknown": pa.bool_(), "guess": pa.string(), "set": pa.list_(pa.string())}
    return pa.schema([("source", pa.string()), ("label", pa.string()), ("top_classes", pa.list_(pa.string())),
                      ("top_probabilities", pa.list_(pa.float32())), ("probabilities", pa.list_(pa.float32())),
                      ("error", pa.string())] + [(k, extra[k]) for k in keys if k in extra])


def predict_parts(bundle: ModelBundle, split: Split, names: list[str], out: str | Path, *, fmt: str = "parquet",
                  top_k: int = 1, batch_size: int = 64, device: str = "auto", backend: str = "torch",
                  workers: int | None = None, strict: bool = False, progress: bool = True,
                  ranks: Ranks | None = None, sets: bool | None = None,
                  reject_unknown: bool | None = None) -> dict[str, Any]:
    """This process's part of a prediction job (see the module's doc); returns a summary.
    ``sets`` / ``reject_unknown``: :meth:`Predictor.use_trust` (None: the model's default;
    True on a model without them: the one-line error naming ``imgcls calibrate``, before
    any work)."""
    Trust(bundle, sets, reject_unknown)  # what use_trust will check, before the folder and files
    r = ranks or Ranks.from_env()
    if fmt not in FORMATS:
        raise ImgclsError(f"unknown part format '{fmt}'", "use parquet or jsonl")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImgclsError(f"cannot create --output {out}: {exc.strerror}", "choose another folder") from None
    part = _PartWriter(out, r, fmt)
    if part.final.exists():
        return {"part": str(part.final), "skipped": True, "rows": None, "parts": part_rows(out, r.world, fmt)}
    total = len(split)
    mine, my_names = my_part(split, names, r)
    t0 = time.perf_counter()
    bar = _Progress(out, r, total, progress)
    tally = _run(bundle, mine, my_names, part, r, fmt, top_k, batch_size, device, backend, workers, strict, bar,
                 (sets, reject_unknown))
    _refuse_if_unreadable(tally, part)
    part.finish()
    others = [out / part_name(k, r.world, fmt) for k in range(r.world) if k != r.rank]
    bar.close(others)
    return {"part": str(part.final), "skipped": False, "rows": tally.rows,
            "seconds": round(time.perf_counter() - t0, 2), "parts": part_rows(out, r.world, fmt)}


@dataclass
class _Tally:
    rows: int = 0  # rows in the part (a resumed JSONL part's earlier rows included)
    errors: int = 0  # rows of images that could not be read (written this run)
    first_error: str | None = None


def _refuse_if_unreadable(tally: _Tally, part: _PartWriter) -> None:
    """A part whose every image was unreadable is an error, not a finished part of error rows:
    it is not marked complete (a rerun does it again)."""
    if tally.rows and tally.errors == tally.rows:
        part.discard()
        raise ImgclsError(f"{part.final.name}: none of its {tally.rows} images could be read "
                          f"(first: {tally.first_error})", "check the files, e.g. with imgcls audit")


def part_name(rank: int, world: int, fmt: str) -> str:
    """``part-00001-of-00004.parquet``: the file of process ``rank`` of ``world``."""
    return f"part-{rank:05d}-of-{world:05d}.{fmt}"


def part_rows(out: Path, world: int, fmt: str) -> dict[str, int | None]:
    """Rows of every finished part of the job in ``out`` (None: not finished yet)."""
    counts: dict[str, int | None] = {}
    for k in range(world):
        p = out / part_name(k, world, fmt)
        counts[p.name] = None if not p.exists() else _count_rows(p, fmt)
    return counts


def _count_rows(p: Path, fmt: str) -> int:
    if fmt == "jsonl":
        with open(p, "rb") as f:
            return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    import pyarrow.parquet as pq

    return pq.ParquetFile(p).metadata.num_rows


def _run(bundle, split, names, part: _PartWriter, r: Ranks, fmt, top_k, batch_size, device, backend, workers,
         strict, bar: _Progress, trust: tuple[bool | None, bool | None] = (None, None)) -> _Tally:
    device = f"cuda:{r.local_rank}" if device == "auto" and r.world > 1 and _cuda() else device
    k = max(1, min(top_k, bundle.num_classes))
    skipped: dict[int, str] | None = None if strict else {}
    resume, pos, rows, tally = part.done_rows, 0, 0, _Tally()
    sources: list[str] = []
    if resume and not split.streamed:
        import torch

        split, names = split.subset(torch.arange(resume, len(split))), names[resume:]
    with Predictor(bundle, backend, device, "auto", batch_size, workers) as p:
        p.use_trust(*trust)
        stream = p.stream(split, skipped=skipped, on_batch=bar.advance, on_sources=sources.append,
                          shard=(r.rank, r.world) if split.streamed else None)
        fields, thresholds = record_fields(bundle, p), bundle.decision_thresholds()
        for logits, _, *feats in stream:
            probs = p.probabilities(logits)
            if split.streamed:
                batch = sources.pop(0) if sources else [""] * len(probs)
                if rows + len(probs) <= resume:  # rows already in the JSONL part
                    rows += len(probs)
                    continue
            else:
                batch = names[pos:pos + len(probs)]
            bad = {i: skipped[pos + i] for i in range(len(probs)) if skipped and pos + i in skipped}
            preds = decide(bundle.classes, probs, batch, k, bad, p.assess(logits, feats[0] if feats else None),
                           thresholds=thresholds)
            out = [record(pred, fields) for pred in preds]
            pos += len(probs)
            rows += len(out)
            tally.errors += sum(1 for row in out if row["error"])
            tally.first_error = tally.first_error or next((row["error"] for row in out if row["error"]), None)
            part.write(out)
    tally.rows = rows + (resume if not split.streamed else 0)
    return tally


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def announce(summary: dict, r: Ranks) -> None:
    """Rank 0's one line: the whole job's rows, every part's count (or that it is unfinished)."""
    if r.rank != 0:
        return
    parts = summary.get("parts") or {Path(summary["part"]).name: summary["rows"]}
    done = {name: n for name, n in parts.items() if n is not None}
    each = ", ".join(f"{name} {'not finished yet' if n is None else f'{n} rows'}" for name, n in parts.items())
    mine = f"; {Path(summary['part']).name} was already complete, skipped" if summary["skipped"] else ""
    print(f"imgcls: {Path(summary['part']).parent}: {sum(done.values())} rows in {len(done)} of {len(parts)} "
          f"part(s) ({each}){mine}", file=sys.stderr)
