"""Typed training configuration.

One pydantic model holds every training knob. CLI flags and YAML keys map one to one
onto its fields (``--batch-size`` <-> ``batch_size``); unknown keys are refused with a
"did you mean" hint; every run saves the fully resolved config as ``config.yaml``, which
``--config`` loads back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from imgcls.errors import ImgclsError, did_you_mean


# what --semi auto means (TrainConfig.semi_parts): the arm that paid on CIFAR-10 with 250 labels
# per class at equal wall-clock on 2 cores (docs/benchmarks.md)
SEMI_AUTO = "pseudo"


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # what to train on and what to train
    data: str | None = None
    model: str | dict[str, Any] = "reference_cnn"
    img_size: int | None = None  # None: the data's native size (arrays) or 224 (photo folders)
    in_chans: int | None = None  # None: the data's channels (1 grayscale, 3 colour)
    val_split: float = 0.1  # held out (stratified) when the data has no validation split
    group_by: str | None = None  # manifest column or path regex: held-out split keeps each group on one side
    unlabeled: str | None = None  # folder / .npz of unlabelled images: pseudo-labels from a teacher (curation/semi.py)
    pseudo_threshold: float = 0.95  # confidence a pseudo-label needs (the teacher's, or FixMatch's weak view)
    pseudo_rounds: int = 1  # pseudo: teachers in turn; each round's student, trained afresh, labels the pool again
    pseudo_balance: bool = False  # pseudo: as many pseudo-labels per class, each class's most confident (CBST)
    # pseudo: the student (and each later round's teacher) starts from scratch, or from the last teacher's weights
    pseudo_student: Literal["fresh", "teacher"] = "fresh"
    # what --unlabeled does (curation/semi.py, engine/consistency.py): pseudo = a teacher's confident
    # pseudo-labels join the training split; fixmatch = weak/strong consistency on the pool in the one
    # training loop; both = the two; auto = what measured best (docs/benchmarks.md)
    semi: Literal["auto", "pseudo", "fixmatch", "both"] = "auto"
    mu: int = 7  # fixmatch: unlabelled images per labelled image in a step
    unlabeled_weight: float = 1.0  # fixmatch: weight of the unlabelled loss (FixMatch's lambda_u)
    strong_augment: Literal["randaugment", "trivialaugment"] = "randaugment"  # fixmatch's strong view (torchvision)
    classes: list[str] | None = None  # fix the class list and order ("a,b,c" on the command line)
    strict: bool = False  # unreadable image files are an error instead of skipped and reported
    balance: Literal["auto", "none", "weights", "sampler"] = "auto"  # class imbalance handling
    # multi-label (data/multilabel.py, engine/multilabel.py): auto = multi-label when the data is
    task: Literal["auto", "single", "multi"] = "auto"
    loss: Literal["auto", "ce", "bce", "asl"] = "auto"  # auto: ce (single-label), bce (multi-label)
    pos_weight: Literal["none", "auto"] = "none"  # bce: weight positives by negatives/positives per label
    threshold_target: str = "f1"  # per-label thresholds on val: f1 (max F1), precision:0.9 or recall:0.9
    cache: bool = True  # keep decoded images on disk (IMGCLS_CACHE_DIR) for later epochs and runs
    # high bit depth / float pixels -> model input (imgcls/data/intensity.py), saved in model.json
    intensity: str = "auto"  # auto | full-range | minmax | percentile:LO,HI | window:LO,HI
    bit_depth: Literal[8, 16] = 8  # 16: keep 16-bit data at 16 bits through the decode cache
    frames: Literal["first", "all"] = "first"  # multi-frame DICOM: first frame, or every frame an image
    # recipe: a named preset (imgcls/engine/recipes.py) fills every field not given explicitly;
    # auto picks one from the data (transfer for a pretrained backbone, fast for in-memory small
    # images, else default)
    recipe: Literal["auto", "fast", "accurate", "reference", "default", "transfer"] = "auto"
    recipe_choice: str | None = None  # written by a run: the one-line reason for its recipe (not a flag)
    epochs: int = 3
    batch_size: int = 128
    lr: float | Literal["auto"] = 3e-3  # auto: run the learning-rate finder first
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: Literal["onecycle", "cosine", "linear", "constant"] = "onecycle"
    warmup_epochs: float = 0.3
    label_smoothing: float = 0.0
    augment: Literal["auto", "none", "light", "standard", "photo"] = "auto"
    hflip: bool | None = None  # None: on for colour images, off for grayscale (digits)
    patience: int | None = None  # early stopping on validation accuracy
    # transfer learning (timm architectures): see docs/transfer.md
    pretrained: bool = False  # start from timm's pretrained weights (Hugging Face hub)
    weights: str | None = None  # local .safetensors / .pth state dict instead of the hub (implies pretrained)
    freeze: Literal["none", "backbone"] = "none"  # backbone: train only the classifier (linear probe)
    unfreeze_at: int | None = None  # with freeze=backbone: epoch from which the backbone unfreezes
    unfreeze: Literal["gradual", "all"] = "gradual"  # gradual: one more stage per epoch, from the top
    backbone_lr: float | None = None  # backbone learning rate as a fraction of lr (None: 0.1 if pretrained)
    layer_decay: float | None = None  # each backbone stage below the top gets this factor less again
    feature_cache: Literal["auto", "on", "off"] = "auto"  # auto: on when the backbone stays frozen
    # after the cached-feature probe, fine-tune the top blocks on cached activations and keep
    # them only if validation accuracy rises (engine/finetune_top.py); the transfer recipe: auto
    finetune_top: Literal["auto", "off"] = "off"
    mixup: float = 0.0  # timm Mixup alpha (0 = off)
    cutmix: float = 0.0  # timm CutMix alpha (0 = off)
    randaugment: str | None = None  # timm RandAugment config string, e.g. rand-m9-mstd0.5
    ema: float = 0.0  # per-step decay of an exponential moving average of the weights (0 = off)
    lookahead: bool = False  # lookahead of weights every 5 steps (airbench's schedule)
    tta: Literal["auto", "none", "flip", "flip-shift"] = "auto"  # test-time augmentation at evaluation
    # machinery
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    workers: int | None = None  # data-loading processes for image files; None: automatic
    shuffle_buffer: int = 1000  # streamed shard sets: samples each loader worker shuffles among
    threads: int | None = None  # CPU compute threads; None: the cores this process may use
    compile: bool = False  # torch.compile the model (pays off on long runs / GPUs)
    out: str = "runs"
    name: str | None = None
    exist_ok: bool = False  # a named run folder that holds a trained model may be replaced (Ultralytics' name)
    # scale and survive (engine/distributed.py, engine/checkpoint.py)
    devices: int = 1  # processes on this machine; >1 starts them through torchrun (DDP)
    deterministic: bool = False  # deterministic kernels + environment and data fingerprint in model.json
    checkpoint_every: float | None = None  # minutes between mid-epoch checkpoints (one per epoch always)
    time_budget: float | None = None  # minutes of training: stop then; the LR schedule follows the clock
    log: str | None = None  # extra experiment logs, comma-separated: tensorboard, mlflow (history.csv always)
    # trust at prediction time (engine/conformal.py, engine/ood.py): fitted after training, stored in model.json
    conformal: float | None = None  # coverage of conformal sets, fitted on a calibration split held out of train
    conformal_method: Literal["aps", "lac", "raps"] = "aps"
    calib_split: float = 0.1  # with conformal: the fraction of train held out for calibration (never trained on)
    ood_method: Literal["msp", "energy", "knn", "layers", "mahalanobis", "react", "vim", "auto"] | None = None  # fit the "unknown" threshold on the validation split

    @field_validator("classes", mode="before")
    @classmethod
    def _split_classes(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [c.strip() for c in v.split(",") if c.strip()]
        if v is not None and len(set(v)) != len(v):
            raise ValueError("lists a class twice")
        if v is not None and len(v) < 2:
            raise ValueError("needs at least two classes")
        return v

    @field_validator("threshold_target")
    @classmethod
    def _threshold_target(cls, v: str) -> str:
        kind, _, value = v.partition(":")
        if kind == "f1" and not value:
            return v
        try:
            ok = kind in ("precision", "recall") and 0.0 < float(value) <= 1.0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("must be f1, precision:P or recall:R with 0 < P, R <= 1 (e.g. precision:0.9)")
        return v

    @field_validator("intensity")
    @classmethod
    def _intensity(cls, v: str) -> str:
        from imgcls.data.intensity import parse_intensity

        try:
            return str(parse_intensity(v))
        except ImgclsError as exc:
            raise ValueError(exc.message) from None

    @field_validator("epochs", "batch_size", "devices")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, v: float | str) -> float | str:
        if v != "auto" and v <= 0:
            raise ValueError("must be greater than 0 (or auto)")
        return v

    @field_validator("mixup", "cutmix", "momentum", "weight_decay", "warmup_epochs")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be at least 0")
        return v

    @field_validator("ema")
    @classmethod
    def _decay(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1), e.g. 0.999")
        return v

    def semi_parts(self) -> tuple[bool, bool]:
        """What ``--unlabeled`` does: (teacher pseudo-labels, FixMatch consistency); ``auto`` is
        :data:`SEMI_AUTO`, the measured best (docs/benchmarks.md, "Unlabelled images")."""
        semi = SEMI_AUTO if self.semi == "auto" else self.semi
        return semi in ("pseudo", "both"), semi in ("fixmatch", "both")

    @field_validator("pseudo_rounds")
    @classmethod
    def _rounds(cls, v: int) -> int:
        if not 1 <= v <= 10:
            raise ValueError("must be 1 to 10 (1: one teacher, then the student)")
        return v

    @field_validator("mu")
    @classmethod
    def _mu(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1 (unlabelled images per labelled image)")
        return v

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("checkpoint_every", "time_budget")
    @classmethod
    def _minutes_positive(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("must be greater than 0 (minutes)")
        return v

    @field_validator("val_split", "pseudo_threshold")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1)")
        return v

    @field_validator("conformal", "calib_split")
    @classmethod
    def _open_fraction(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError("must be between 0 and 1, e.g. 0.9")
        return v

    @field_validator("label_smoothing")
    @classmethod
    def _smoothing(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1)")
        return v

    @field_validator("patience")
    @classmethod
    def _patience(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be at least 1 (epochs without improvement), or unset for no early stopping")
        return v

    @field_validator("unfreeze_at")
    @classmethod
    def _epoch_opt(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be an epoch number, at least 1")
        return v

    @field_validator("backbone_lr", "layer_decay")
    @classmethod
    def _scale(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError("must be a fraction in [0, 1]")
        return v

    @field_validator("img_size", "in_chans")
    @classmethod
    def _positive_opt(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be at least 1")
        return v

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        unknown = [k for k in values if k not in cls.model_fields]
        if unknown:
            key = unknown[0]
            flag = "--" + key.replace("_", "-")
            hint = did_you_mean(key, cls.model_fields) or "see `imgcls train --help`"
            raise ImgclsError(f"unknown key '{key}' in {source} ({flag})", hint)
        try:
            return cls(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "value"
            flag = "--" + key.split(".")[0].replace("_", "-")
            raise ImgclsError(
                f"invalid value for '{key}' ({flag}) in {source}: {err['msg']}",
                f"got {err.get('input')!r}",
            ) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ImgclsError(f"config file not found: {path}", "check the path given to --config")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ImgclsError(f"{path} is not valid YAML{where}", "fix the syntax") from None
        if not isinstance(values, dict):
            raise ImgclsError(f"{path} must hold a mapping of config keys", "e.g. `epochs: 3`")
        values.update(overrides or {})
        return cls.from_dict(values, source=str(path))

    def to_yaml(self, path: str | Path, exclude_unset: bool = False) -> None:
        """Every field (a run's config.yaml), or with ``exclude_unset`` only those given
        explicitly, so that whoever reads it back still fills the rest from the recipe."""
        Path(path).write_text(yaml.safe_dump(self.model_dump(exclude_unset=exclude_unset), sort_keys=False))
