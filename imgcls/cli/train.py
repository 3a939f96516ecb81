"""imgcls train: flags are generated from TrainConfig, so flags and YAML keys match."""

from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path
from typing import Any

from imgcls.config import TrainConfig
from imgcls.errors import ImgclsError

NAME = "train"
HELP = "train a classifier and write a run folder (runs/train, runs/train2, ...)"

_HELP = {
    "data": "class folder tree, Keras-style .npz, dataset name (digits, mnist, fashion-mnist, cifar10), or a shard "
            "set from `imgcls shard` (folder, train-{000000..000009}.tar pattern, http(s)/s3/gs URL)",
    "model": "architecture: reference_cnn or any timm name (resnet18, efficientnet_b0, ...)",
    "img_size": "input side in pixels (default: the data's own size, or 224 for photos)",
    "in_chans": "input channels, 1 or 3 (default: the data's)",
    "val_split": "fraction of train held out for validation when the data has no val split",
    "unlabeled": "folder or .npz of unlabelled images for semi-supervised training (--semi)",
    "pseudo_threshold": "confidence a pseudo-label needs (with --unlabeled): the teacher's, or FixMatch's on the "
                        "weak view",
    "pseudo_rounds": "with --unlabeled pseudo: rounds of self-training; each round's student, trained from "
                     "scratch, is the next round's teacher and labels the pool again",
    "pseudo_balance": "with --unlabeled pseudo: keep as many pseudo-labels for every class (each class's most "
                      "confident; the threshold sets the total) instead of all above the threshold",
    "pseudo_student": "with --unlabeled pseudo: the student starts from scratch (fresh) or from the teacher's "
                      "weights (teacher: no time spent relearning what the teacher knew, under --time-budget)",
    "semi": "with --unlabeled: pseudo (a teacher's confident pseudo-labels join the training split), fixmatch "
            "(weak/strong-augmentation consistency on the pool in the training loop), both; auto: "
            "the measured best",
    "mu": "fixmatch: unlabelled images per labelled image in each step",
    "unlabeled_weight": "fixmatch: weight of the loss on the unlabelled images",
    "strong_augment": "fixmatch: the strong augmentation (torchvision RandAugment or TrivialAugmentWide)",
    "time_budget": "minutes of training (validation included): training stops then and the learning-rate "
                   "schedule follows the clock (--epochs stays an upper bound); with --unlabeled pseudo the "
                   "teacher, the pool prediction and the student share it",
    "group_by": "keep each group on one side of the held-out split: a manifest COLUMN (e.g. run) or a REGEX "
                "on the file path whose first capture group is the group",
    "warmup_epochs": "linear learning-rate warm-up length, in epochs",
    "augment": "augmentation preset (auto picks by data kind)",
    "hflip": "random horizontal flips (default: on for colour, off for grayscale)",
    "patience": "stop after N epochs without a better validation accuracy",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "precision": "auto uses bf16 on GPUs and on CPUs with fast bf16, else fp32",
    "workers": "image-decoding processes (default: automatic)",
    "shuffle_buffer": "streamed shard sets (imgcls shard): samples each loader worker shuffles among",
    "recipe": "preset of the fields below (fast, accurate, reference, default, transfer); explicit flags override "
              "it; auto: transfer with --weights/--pretrained, fast for large in-memory sets, else default",
    "lr": "learning rate, or auto to pick one with the learning-rate finder",
    "finetune_top": "after a cached-feature linear probe, fine-tune the top block on cached activations and keep "
                    "it only if validation accuracy rises (the transfer recipe: auto)",
    "mixup": "mixup alpha (timm), e.g. 0.2; 0 = off",
    "cutmix": "cutmix alpha (timm), e.g. 1.0; 0 = off",
    "randaugment": "timm RandAugment config, e.g. rand-m9-mstd0.5 (natural images)",
    "ema": "keep an exponential moving average of the weights with this per-step decay, e.g. 0.999",
    "tta": "test-time augmentation at evaluation (auto: flips for small colour images trained with flips)",
    "lookahead": "lookahead of the weights every 5 steps, averaging more as training ends (airbench)",
    "threads": "CPU compute threads (default: the cores this process may use)",
    "compile": "torch.compile the model (warm-up costs tens of seconds on a CPU)",
    "classes": "comma-separated class names: fixes the class list and order (default: all, sorted)",
    "strict": "stop on unreadable image files instead of skipping them (listed in RUN/skipped.csv)",
    "balance": "class imbalance: weighted loss, balanced sampler, none, or auto (weights when the "
               "largest class has 3x the images of the smallest)",
    "cache": "keep decoded images on disk so later epochs and runs skip JPEG decoding",
    "intensity": "16-bit / float pixels -> model input: auto, full-range, minmax, percentile:0.5,99.5 or "
                 "window:LO,HI (auto: full range for 8-bit and full-range 16-bit data, else a percentile window)",
    "bit_depth": "16 keeps 16-bit images (radiographs, microscopy) at 16 bits through the decode cache",
    "frames": "multi-frame DICOM files: the first frame, or every frame as an image",
    "out": "parent folder of run folders",
    "name": "run folder name (default: train, train2, ...)",
    "exist_ok": "with --name: replace a run folder that already holds a trained model (else refused)",
    "devices": "processes on this machine (one per GPU, or CPU processes): >1 runs DistributedDataParallel "
               "through torchrun; --batch-size stays the global batch",
    "deterministic": "seed everything, use deterministic kernels, record environment and data fingerprint",
    "checkpoint_every": "also checkpoint every N minutes inside an epoch (always at each epoch end)",
    "task": "auto: multi-label when the data is (a manifest 'labels' column with cat;dog, 0/1 class columns, "
            "a 2-D 0/1 y_train); single or multi forces it",
    "loss": "auto: ce for one class per image, bce for multi-label; asl: timm's asymmetric loss (multi-label)",
    "pos_weight": "multi-label bce: auto weights each label's positives by negatives/positives (rare labels)",
    "threshold_target": "multi-label per-class thresholds tuned on val: f1 (max F1), precision:0.9 or recall:0.9",
    "conformal": "fit conformal prediction sets with this coverage (e.g. 0.9) on a calibration split held out of train",
    "conformal_method": "conformal score: aps (even coverage across classes), lac (smallest sets) or raps "
                        "(APS with a penalty on unlikely classes)",
    "calib_split": "with --conformal: fraction of train held out for calibration (never trained on)",
    "ood_method": "fit the 'unknown' threshold for this OOD score on the validation split (95%% accepted); "
                  "auto: the best on docs/benchmarks.md (multi-label: per-label energy)",
    "log": "extra experiment logs, comma-separated: tensorboard (RUN/tensorboard), mlflow; history.csv is always written",
}


_NOT_FLAGS = {"recipe_choice"}  # written by a run into config.yaml, not set by users


def _flag_type(annotation: Any) -> tuple[Any, list[str] | None]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) > 1 and any(typing.get_origin(a) is typing.Literal for a in args):
        return str, None  # e.g. a number or "auto": pydantic converts
    if typing.get_origin(annotation) is typing.Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), choices  # str, or int for Literal[8, 16]
    if annotation in (int, float, str):
        return annotation, None
    for a in args:
        if typing.get_origin(a) is typing.Literal:
            return str, list(typing.get_args(a))
    for t in (int, float, str):
        if t in args:
            return t, None
    return str, None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="load settings from YAML; flags override it")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from RUN/checkpoint.pt, with its "
                   "own config.yaml (only --checkpoint-every and --workers may change)")
    for name, field in TrainConfig.model_fields.items():
        if name in _NOT_FLAGS:
            continue
        flag = "--" + name.replace("_", "-")
        default = field.default
        helptext = f"{_HELP.get(name, name.replace('_', ' '))} (default: {default})"
        if name == "hflip" or field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=helptext)
            continue
        typ, choices = _flag_type(field.annotation)
        p.add_argument(flag, dest=name, type=typ, choices=choices, default=argparse.SUPPRESS, help=helptext,
                       metavar=None if choices else name.upper())


RESUME_OVERRIDES = ("checkpoint_every", "workers")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields}
    if getattr(args, "resume", None):
        from imgcls.runs import resume_config

        fixed = [k for k in overrides if k not in RESUME_OVERRIDES] + (["config"] if args.config else [])
        if fixed:
            flag = "--" + fixed[0].replace("_", "-")
            raise ImgclsError(f"{flag} cannot be combined with --resume: a run continues with its own config.yaml",
                              "drop the flag, or start a new run")
        return resume_config(args.resume).model_copy(update=overrides)
    if args.config:
        return TrainConfig.from_yaml(args.config, overrides)
    return TrainConfig.from_dict(overrides, source="command line")


def run(args: argparse.Namespace) -> int:
    if os.environ.get("IMGCLS_LAUNCH_DIR") and "RANK" in os.environ:  # (engine/distributed.py LAUNCH_DIR)
        return _as_launched_worker(args)
    from imgcls.engine.checkpoint import TrainingInterrupted

    try:
        return _run(args)
    except TrainingInterrupted as exc:
        if int(os.environ.get("RANK", "0")) == 0:  # one message, not one per process
            print(f"imgcls train: {exc.oneline()}", file=sys.stderr)
        return 128 + exc.signum


def _as_launched_worker(args: argparse.Namespace) -> int:
    """One of the processes ``--devices N`` started: its outcome (exit code and the one line
    the user sees) goes to the launcher, which prints it once; the process itself exits 0, so
    torchrun has no failure to report (engine/distributed.py launch). --debug / IMGCLS_DEBUG=1
    keep the tracebacks (and torchrun's report)."""
    import signal

    from imgcls.engine.checkpoint import TrainingInterrupted

    debug = getattr(args, "debug", False) or os.environ.get("IMGCLS_DEBUG") == "1"
    try:
        from imgcls.engine import distributed  # noqa: F401 (takes SIGINT / SIGTERM back from the launcher)

        return _run(args)
    except TrainingInterrupted as exc:
        code, line = 128 + exc.signum, f"imgcls train: {exc.oneline()}"
    except ImgclsError as exc:
        if debug:
            raise
        code, line = 1, f"imgcls train: error: {exc.oneline()}"
    except KeyboardInterrupt as exc:  # outside training (which checkpoints instead): before it, or evaluating
        signum = getattr(exc, "signum", signal.SIGINT)
        code = 128 + signum
        line = "imgcls train: interrupted" if signum == signal.SIGINT else \
            f"imgcls train: stopped by {signal.Signals(signum).name}"
    except Exception as exc:
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        code, line = 3, (f"imgcls train: internal error: {type(exc).__name__}: {first} "
                         "(rerun with --debug for the traceback and report it)")
    D = sys.modules.get("imgcls.engine.distributed")  # (None: it failed to import)
    if D is None or not D.report_outcome(code, line):
        print(line, file=sys.stderr)
        return code
    return 0


def _run(args: argparse.Namespace) -> int:
    from imgcls.runs import train
    from imgcls.engine import distributed as D

    cfg = config_from_args(args)
    if getattr(args, "resume", None) and _already_complete(args.resume):
        return 0
    if cfg.devices > 1 and not D.launched_by_torchrun():
        return _launch(cfg, args)
    result = train(cfg, resume=getattr(args, "resume", None))
    if not result.metrics:  # ranks other than 0 under torchrun: rank 0 reports
        return 0
    m = result.metrics
    s = result.summary
    print(f"trained {result.classifier.architecture} on {s['data']} for {s['epochs_run']} epoch(s) in "
          f"{s['train_time_s']:.1f}s ({s['device']}, {s['precision']}, recipe {s.get('recipe', '?')}); "
          f"best epoch {s['best_epoch']}")
    if m.get("task") == "multi":
        print(f"{m['split']} mAP: {m['map_macro']:.4f} (exact match {m['exact_match']:.4f}, CF1 {m['cf1']:.4f}) "
              f"on {m['num_images']} images; per-class thresholds "
              f"({result.classifier.card.get('thresholds', {}).get('target', '?')}) in model.json")
    else:
        print(f"{m['split']} accuracy: {m['accuracy']:.4f} on {m['num_images']} images")
    print(f"model saved to {result.run_dir}")
    sys.stdout.flush()
    return 0


def _already_complete(run_dir: str) -> bool:
    """``--resume`` of a run with nothing left to train: said in one line (exit 0, as a job
    that is resubmitted after it finished expects); its files stay as they are."""
    from imgcls.runs import completed_run

    metrics = completed_run(run_dir)
    if metrics is None:
        return False
    if int(os.environ.get("RANK", "0")) == 0:
        epochs = metrics["training"].get("epochs_run", "all")
        print(f"imgcls train: {run_dir} is already complete ({epochs} epoch(s) trained, evaluated and saved); "
              f"nothing to resume (to train it again: imgcls train --config {Path(run_dir) / 'config.yaml'} "
              "--exist-ok)", file=sys.stderr)
    return True


def check_before_launch(cfg: TrainConfig) -> None:
    """What --devices N can refuse before it starts N processes (each would say it, and only
    after importing torch and loading the data): data that does not exist, a --batch-size that
    does not divide over the processes, a trained run folder of that name, a --log typo."""
    from imgcls.engine import distributed as D
    from imgcls.rundir import RunDir
    from imgcls.runs import check_data_spec, next_run_dir

    if not cfg.data:
        raise ImgclsError("no data given", "pass --data FOLDER|FILE.npz|NAME (e.g. --data digits)")
    check_data_spec(cfg.data)
    if "batch_size" in cfg.model_fields_set:  # (a recipe's batch, chosen from the data, each process refuses
        D.local_batch_size(cfg.batch_size, D.DistContext(world_size=cfg.devices))  # before the run folder is made)
    if cfg.name:
        RunDir(next_run_dir(cfg.out, cfg.name)).claim(cfg.exist_ok, replace=False)
    if cfg.log:
        from imgcls.engine.loggers import parse_log

        parse_log(cfg.log)


def _launch(cfg: TrainConfig, args: argparse.Namespace) -> int:
    """--devices N: the same command, once per process, under torchrun."""
    import tempfile

    from imgcls.engine import distributed as D

    if getattr(args, "resume", None):
        from imgcls.runs import check_resume_data

        check_resume_data(cfg, args.resume)
        extra = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in RESUME_OVERRIDES if hasattr(args, k)]
        return D.launch(cfg.devices, ["--resume", str(args.resume), *extra])
    check_before_launch(cfg)
    fd, path = tempfile.mkstemp(prefix="imgcls-train-", suffix=".yaml")
    os.close(fd)
    try:
        # only what the user set: every process resolves the recipe from the data, as one process
        # does (the full dump made every field look explicit, and the recipe's lr, label smoothing
        # and augmentation gave way to the TrainConfig defaults under --devices N)
        cfg.to_yaml(path, exclude_unset=True)
        return D.launch(cfg.devices, ["--config", path])
    finally:
        os.unlink(path)
