"""The run-folder workflow over the API: ``imgcls.train(config)`` does everything
``imgcls train`` does (data, recipe, model, fit, evaluate, a run folder), and
``imgcls.find_lr(config)`` what ``imgcls lr-find`` does."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imgcls.api import Classifier
from imgcls.config import TrainConfig
from imgcls.data.pipeline import require_train
from imgcls.data.decode import typical_side
from imgcls.data.records import ImageData, Split
from imgcls.data.split import stratified_split
from imgcls.data.sources import load_data
from imgcls.engine import distributed as D
from imgcls.engine.checkpoint import CHECKPOINT, TrainingInterrupted, load_checkpoint, preflight_run_dir
from imgcls.engine.device import resolve_device
from imgcls.engine.lr_find import LRFindResult
from imgcls.engine.model_hooks import start_from
from imgcls.engine.recipes import RecipeContext, resolve_recipe
from imgcls.engine.reproducibility import set_deterministic
from imgcls.errors import ImgclsError
from imgcls.models import model_from_config
from imgcls.rundir import RunDir


def next_run_dir(out: str | Path, name: str | None = None, base: str = "train") -> Path:
    """``out/train``, ``out/train2``, ... (or ``out/NAME`` when a name is given)."""
    out = Path(out)
    if name:
        return out / name
    i = 1
    while (out / (base if i == 1 else f"{base}{i}")).exists():
        i += 1
    return out / (base if i == 1 else f"{base}{i}")


@dataclass
class TrainResult:
    run_dir: Path
    classifier: Classifier
    metrics: dict[str, Any]
    summary: dict[str, Any]


def train(config: TrainConfig | dict[str, Any] | None = None, progress: bool = True,
          resume: str | Path | None = None) -> TrainResult:
    """Everything ``imgcls train`` does: data, recipe, model, fit, evaluate, and a run folder
    (model.safetensors, model.json, config.yaml, history.csv, metrics.json, checkpoint.pt).
    ``resume``: a run folder to continue from its checkpoint (with its own config.yaml
    unless ``config`` is given). Under torchrun every process calls this; rank 0 alone
    writes the run folder."""
    if resume is not None and config is None:
        config = resume_config(resume)
    if config is None:
        raise ImgclsError("no training config given", "pass a TrainConfig, a dict, or resume=RUN_FOLDER")
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if not cfg.data:
        raise ImgclsError("no data given", "pass --data FOLDER|FILE.npz|NAME (e.g. --data digits)")
    if resume is not None:
        check_resume_data(cfg, resume)
    joined_here = D.launched_by_torchrun() and not D.current().enabled
    ctx = D.setup(cfg.device)
    try:
        result = _train(cfg, ctx, progress, Path(resume) if resume is not None else None)
        D.barrier(ctx)  # rank 0 evaluates and saves while the others wait, then all leave together
        return result
    finally:
        if joined_here:
            D.cleanup()


def resume_config(run_dir: str | Path) -> TrainConfig:
    """The config a run folder was trained with (its config.yaml)."""
    return RunDir(run_dir).read_config()


def completed_run(run_dir: str | Path) -> dict[str, Any] | None:
    """metrics.json of a run that has nothing left to resume (every epoch trained, or stopped
    early, then evaluated and saved: the run's last write), else None."""
    run = RunDir(run_dir)
    metrics = run.read_metrics()
    if run.has_model() and isinstance(metrics.get("training"), dict) and isinstance(metrics.get("evaluation"), dict):
        return metrics
    return None


# config fields that name a file or folder: saved absolute, so that `--resume RUN` and
# `--config RUN/config.yaml` find them from any working folder
PATH_FIELDS = ("data", "unlabeled", "weights")


def _is_url(text: str) -> bool:
    return "://" in text


def saved_config(cfg: TrainConfig, ctx: D.DistContext) -> TrainConfig:
    """What a run writes into config.yaml: ``cfg`` with the paths that exist made absolute
    (dataset names, URLs and shard patterns as given) and ``devices`` the number of processes
    that trained it (a torchrun-launched run's, too: its checkpoint resumes only with as many)."""
    update: dict[str, Any] = {"devices": ctx.world_size} if ctx.enabled else {}
    for key in PATH_FIELDS:
        value = getattr(cfg, key)
        if isinstance(value, str) and value and not _is_url(value) and Path(value).expanduser().exists():
            update[key] = os.path.abspath(os.path.expanduser(value))
    return cfg.model_copy(update=update)


def check_data_spec(spec: Any) -> None:
    """Cheaply, without loading anything: that ``spec`` names a file or folder that exists,
    a dataset or a shard set; else the one-process run's own refusal ("data path not
    found", "unknown dataset ... did you mean"). Before --devices N starts its processes."""
    from imgcls.data.datasets import DATASETS
    from imgcls.data.shardset import is_shard_spec
    from imgcls.data.sources import _resolve

    if not isinstance(spec, (str, Path)) or is_shard_spec(spec) or Path(str(spec)).expanduser().exists() \
            or str(spec).lower() in DATASETS:
        return
    _resolve(spec)  # (nothing exists to read: it raises the refusal)


def _started_from(run_dir: Path, cfg: TrainConfig) -> Path | None:
    """The folder an older run (config.yaml with the data path as typed) was most likely
    started from: the run folder less its relative --out and name, if the data is there."""
    out = Path(cfg.out)
    if out.is_absolute() or ".." in out.parts:
        return None
    run = Path(run_dir).absolute()
    if len(run.parts) <= len(out.parts) + 1 or tuple(run.parts[-len(out.parts) - 1:-1]) != out.parts:
        return None
    origin = run.parents[len(out.parts)]
    return origin if (origin / str(cfg.data)).exists() else None


def check_resume_data(cfg: TrainConfig, run_dir: str | Path) -> None:
    """The data a resumed run trains on must exist from here; a relative path of an older
    config.yaml (saved as typed) is refused with the folder to resume from."""
    try:
        check_data_spec(cfg.data)
    except ImgclsError:
        spec = str(cfg.data)
        if not (any(ch in spec for ch in "/\\") or Path(spec).suffix) or Path(spec).expanduser().is_absolute():
            raise
        origin = _started_from(Path(run_dir), cfg)
        where = f"the folder the run was started from, {origin}" if origin else "the folder the run was started from"
        raise ImgclsError(f"data path not found: {spec} (config.yaml of {run_dir} gives it relative to {where}; "
                          f"this is {Path.cwd()})",
                          f"run the resume from there: cd {origin or 'THAT_FOLDER'} && imgcls train --resume "
                          f"{Path(run_dir).absolute()}") from None


def _on_rank0(ctx: D.DistContext, fn):
    """Run ``fn`` on rank 0 and hand its result - or its ImgclsError - to every rank,
    so a refusal (bad folder, full disk) stops all processes with the same message."""
    out, err = None, None
    if ctx.is_main:
        try:
            out = fn()
        except ImgclsError as exc:
            err = (exc.message, exc.hint)
    out, err = D.broadcast_object((out, err), ctx)
    if err:
        raise ImgclsError(*err)
    return out


def _make_run_dir(cfg: TrainConfig, resume: Path | None, model: torch.nn.Module,
                  ctx: D.DistContext) -> tuple[str, str | None]:
    """The run folder, ready (config.yaml written for a new run); and the outermost folder
    created for it here (None: it existed)."""
    run_dir = resume if resume is not None else next_run_dir(cfg.out, cfg.name)
    if resume is None and cfg.name:
        RunDir(run_dir).claim(cfg.exist_ok)  # never a silent overwrite of a trained run
    created = None
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            break
        created = str(folder)
    try:
        run_dir.mkdir(parents=True, exist_ok=bool(cfg.name) or resume is not None)
    except OSError as exc:
        raise ImgclsError(f"cannot create run folder {run_dir}: {exc.strerror}", "choose another --out") from None
    try:
        preflight_run_dir(run_dir, model)  # unwritable or full: fail now, not after hours of training
    except ImgclsError:
        _discard(RunDir(run_dir), created if resume is None else None)
        raise
    if resume is None:
        RunDir(run_dir).write_config(saved_config(cfg, ctx))
    return str(run_dir), created


def _discard(run: RunDir, created: str | None) -> None:
    """A new run refused before its first checkpoint: nothing in its folder can be resumed, so
    its config.yaml goes, and the folders this run made (``created`` and those below it, down
    to the run folder) where they are empty now."""
    if (run / CHECKPOINT).exists():
        return
    (run / "config.yaml").unlink(missing_ok=True)
    if created is None:
        return
    folder = run.path
    while True:
        try:
            folder.rmdir()
        except OSError:
            return  # other files (skipped.csv: the unreadable images) stay for the user to see
        if folder == Path(created) or folder.parent == folder:
            return
        folder = folder.parent


def _train(cfg: TrainConfig, ctx: D.DistContext, progress: bool, resume: Path | None) -> TrainResult:
    if cfg.deterministic:
        set_deterministic(cfg.seed)
    ckpt = _on_rank0(ctx, lambda: load_checkpoint(resume / CHECKPOINT)) if resume is not None else None
    if resume is None and cfg.name:  # a trained run of that name: refused now, not after loading the data
        _on_rank0(ctx, lambda: RunDir(next_run_dir(cfg.out, cfg.name)).claim(cfg.exist_ok, replace=False))
    if cfg.log:  # a typo in --log should fail before anything is trained or written
        from imgcls.engine.loggers import parse_log

        parse_log(cfg.log)
    data = require_train(load_data(cfg.data, val_split=cfg.val_split, seed=cfg.seed, classes=cfg.classes,
                                          group_by=cfg.group_by, task=cfg.task))
    data, calib = hold_out_calibration(data, cfg)
    if resume is None:  # a resumed run keeps the values its config.yaml already holds
        cfg = resolve_recipe(cfg, recipe_context(cfg, data))
    D.local_batch_size(cfg.batch_size, ctx)  # the recipe's batch, refused before the run folder is made
    init = None  # weights the model starts from: the teacher's with --pseudo-student teacher
    if cfg.unlabeled and cfg.semi_parts()[0]:  # semi-supervised: a teacher's confident pseudo-labels join train
        from imgcls.curation.semi import add_pseudo_labels

        data, cfg, init = add_pseudo_labels(cfg, data, progress and ctx.is_main)
    clf = Classifier.from_config(cfg, data)
    if init is not None:
        start_from(clf.model, init)
    cfg = cfg.model_copy(update={"img_size": clf.preprocessing.img_size, "in_chans": clf.preprocessing.in_chans})
    made, created = _on_rank0(ctx, lambda: _make_run_dir(cfg, resume, clf.model, ctx))
    run = RunDir(made)
    try:
        summary = clf.fit(data, cfg, run_dir=run.path, progress=progress, resume=ckpt)
    except ImgclsError as exc:
        if resume is None and ctx.is_main and not isinstance(exc, TrainingInterrupted):
            _discard(run, created)
        raise
    summary["recipe"] = cfg.recipe
    if not ctx.is_main:
        return TrainResult(run_dir=run.path, classifier=clf, metrics={}, summary=summary)
    fit_trust(clf, cfg, data, calib)
    # the training data as loaded (its held-out validation split): test if there is one, else val;
    # unreadable files were reported by fit already
    metrics = clf.evaluate(data, device=str(ctx.device) if ctx.enabled else cfg.device, precision=cfg.precision,
                           cache=cfg.cache, announce=False)
    clf.card["metrics"] = {"best_val": summary["best"], metrics["split"]: _headline(metrics)}
    clf.save(run.path)
    run.update_metrics(training=summary, evaluation=metrics)
    return TrainResult(run_dir=run.path, classifier=clf, metrics=metrics, summary=summary)


def hold_out_calibration(data: ImageData, cfg: TrainConfig) -> tuple[ImageData, Split | None]:
    """With ``--conformal``: a stratified ``calib_split`` of train (seeded, so a resumed run holds
    out the same images) that training never sees, for the conformal sets."""
    if data.multi_label and cfg.conformal is not None:
        raise ImgclsError(f"--conformal is for single-label data; {data.name} is multi-label (label sets)",
                          "multi-label models decide with per-class thresholds (model.json 'thresholds'); "
                          "--ood-method energy gives them the unknown answer")
    if data.multi_label and cfg.ood_method == "msp":
        raise ImgclsError(f"--ood-method msp is a softmax score; {data.name} is multi-label (a sigmoid per label)",
                          "use --ood-method energy (per-label energy) or knn")
    if cfg.conformal is None:
        return data, None
    if data.train.streamed:
        raise ImgclsError("--conformal holds out training images, which a streamed shard set cannot",
                          "train without it, then run imgcls calibrate RUN --data DATA --coverage 0.9")
    keep, hold = stratified_split(data.train.labels, cfg.calib_split, cfg.seed + 1)
    calib = data.train.subset(hold)
    data = dataclasses.replace(data, train=data.train.subset(keep),
                               notes=[*data.notes, f"held out {len(hold)} training images for conformal calibration"])
    return data, calib


CALIB_SPLIT = "calib_split"  # model.json's fitted_on for the --calib-split hold-out of train (never evaluated)


def fit_trust(clf: Classifier, cfg: TrainConfig, data: ImageData, calib: Split | None) -> None:
    """After training: conformal sets (and temperature) on the calibration split, and the unknown
    threshold on the validation split, into ``clf.card`` (saved with the model)."""
    if calib is not None:
        clf.calibrate(dataclasses.replace(data, val=calib), split="val", device=cfg.device, coverage=cfg.conformal,
                      conformal=cfg.conformal_method, fitted_on=CALIB_SPLIT)
    if cfg.ood_method is not None:
        clf.calibrate(data, split="val", device=cfg.device, temperature=False, ood_method=cfg.ood_method)


def recipe_context(cfg: TrainConfig, data: ImageData) -> RecipeContext:
    in_memory = bool(data.train is not None and data.train.in_memory)
    ctx = RecipeContext(kind=data.kind, num_train=len(data.train) if data.train is not None else 0,
                        in_memory=in_memory, device_type=resolve_device(cfg.device).type,
                        pretrained=bool(cfg.pretrained or cfg.weights),
                        raw_stream=bool(data.train is not None and data.train.streamed
                                        and data.train.shards.encoding == "raw"))
    if ctx.pretrained and data.train is not None:
        from imgcls.models.pretrained import pretrained_input

        arch, _ = model_from_config(cfg.model)
        ctx.pretrained_side, ctx.fixed_side = pretrained_input(arch)
        ctx.image_side = typical_side(data.train.paths) if data.train.paths is not None else data.native_size
    return ctx


def find_lr(config: TrainConfig | dict[str, Any], steps: int = 100, start_lr: float = 1e-7,
            end_lr: float = 10.0) -> tuple[LRFindResult, TrainConfig]:
    """What ``imgcls lr-find`` does: the model and data of a training config (recipe
    resolved), then the learning-rate range test. Returns the result and resolved config."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if not cfg.data:
        raise ImgclsError("no data given", "pass --data FOLDER|FILE.npz|NAME (e.g. --data digits)")
    data = load_data(cfg.data, val_split=cfg.val_split, seed=cfg.seed, classes=cfg.classes,
                                          group_by=cfg.group_by, task=cfg.task)
    cfg = resolve_recipe(cfg, recipe_context(cfg, data))
    res = Classifier.from_config(cfg, data).find_lr(data, cfg, steps=steps, start_lr=start_lr, end_lr=end_lr)
    return res, cfg


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k in ("accuracy", "loss", "num_images", "top3_accuracy",
                                                 "top5_accuracy", "macro_avg", "map_macro", "map_micro", "cf1",
                                                 "of1", "exact_match", "hamming_loss")}
