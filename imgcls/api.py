"""The Python API. The CLI, the web service and reports are thin layers over this.

    from imgcls import Classifier
    clf = Classifier.create("reference_cnn", num_classes=10, in_chans=1, img_size=28)
    clf.fit("digits", epochs=3)                    # TrainConfig keys as keyword overrides
    clf.evaluate("digits")["accuracy"]
    clf.predict(["seven.png"], top_k=3)
    clf.save("my_model"); clf = Classifier.load("my_model")

A :class:`Classifier` is a :class:`~imgcls.bundle.ModelBundle` (network, classes,
preprocessing, temperature, card) with methods that call one spine: training runs in an
:class:`~imgcls.engine.session.TrainingSession`, every prediction goes through an
:class:`~imgcls.engine.predictor.Predictor`, and both get their batches from the one
data pipeline (:mod:`imgcls.data.pipeline`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.bundle import ModelBundle
from imgcls.config import TrainConfig
from imgcls.data.pipeline import as_split, expand_frames
from imgcls.data.records import ImageData
from imgcls.data.sources import load_data
from imgcls.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from imgcls.engine.callbacks import Callback
from imgcls.engine.decisions import Prediction, check_top_k, decide  # noqa: F401 (Prediction: part of the API)
from imgcls.engine.lr_find import LRFindResult
from imgcls.engine.predictor import Predictor, eval_data
from imgcls.engine.reproducibility import seed_everything
from imgcls.engine.session import TrainingSession
from imgcls.errors import ImgclsError
from imgcls.evaluation.metrics import classification_metrics
from imgcls.evaluation.multilabel import multilabel_metrics
from imgcls.models import MODEL_DEFAULTS, create_model, model_from_config
from imgcls.version import library_versions  # noqa: F401 (part of the API since 0.1)


def _class_names(num_classes: int | None, classes: list[str] | None, what: str) -> list[str]:
    if classes is None:
        if num_classes is None:
            raise ImgclsError(f"{what} needs num_classes or classes", "e.g. num_classes=10")
        classes = [str(i) for i in range(num_classes)]
    elif num_classes is not None and num_classes != len(classes):
        raise ImgclsError(f"num_classes={num_classes} but {len(classes)} class names were given",
                          "give one or make them agree")
    if len(classes) < 2:
        raise ImgclsError("a classifier needs at least two classes", "give num_classes >= 2")
    return list(classes)


class Classifier(ModelBundle):
    """A model together with its classes and preprocessing: everything needed to train,
    evaluate, predict and be saved and loaded again (``Classifier.load(run)``)."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, architecture: str = "reference_cnn", num_classes: int | None = None,
               classes: list[str] | None = None, in_chans: int | None = None,
               img_size: int | None = None, seed: int | None = None, **model_kwargs: Any) -> Classifier:
        """A new, randomly initialised model (``seed`` makes the initial weights reproducible)."""
        if seed is not None:
            seed_everything(seed)
        classes = _class_names(num_classes, classes, "Classifier.create")
        defaults = MODEL_DEFAULTS.get(architecture, {})
        in_chans = in_chans or defaults.get("in_chans", 3)
        img_size = img_size or defaults.get("img_size", 224)
        model = create_model(architecture, len(classes), in_chans=in_chans, img_size=img_size, **model_kwargs)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)
        pre = Preprocessing(img_size=img_size, in_chans=in_chans, mean=mean, std=std)
        return cls(model, architecture=architecture, classes=classes, preprocessing=pre, model_kwargs=model_kwargs)

    @classmethod
    def from_pretrained(cls, architecture: str, num_classes: int | None = None, classes: list[str] | None = None,
                        weights: str | Path | None = None, in_chans: int = 3, img_size: int | None = None,
                        seed: int | None = None, **model_kwargs: Any) -> Classifier:
        """A timm architecture with pretrained weights (from ``weights``, a local .safetensors /
        .pth state dict, else timm's hub download) and a new head for ``classes``. The
        pretrained mean/std, input size, interpolation and crop become the preprocessing."""
        from imgcls.models.pretrained import create_pretrained

        if seed is not None:
            seed_everything(seed)  # the new head's initial weights
        classes = _class_names(num_classes, classes, "Classifier.from_pretrained")
        model, info = create_pretrained(architecture, len(classes), in_chans=in_chans, weights=weights, **model_kwargs)
        pre = Preprocessing(img_size=img_size or info.input_size, in_chans=in_chans, mean=info.mean, std=info.std,
                            resize="shorter_side", crop_pct=info.crop_pct, interpolation=info.interpolation)
        return cls(model, architecture=architecture, classes=classes, preprocessing=pre, model_kwargs=model_kwargs,
                   card={"pretrained": info.to_card()})

    @classmethod
    def from_config(cls, cfg: TrainConfig | dict[str, Any], data: Any) -> Classifier:
        """The fresh (or pretrained) classifier a training config describes, for ``data`` (what
        ``fit`` takes: a folder, manifest, .npz, dataset name, arrays or ImageData, loaded as
        training loads it): architecture or layer list, weights, channels and input size (the
        data's own when the config leaves them open)."""
        cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
        if not isinstance(data, ImageData):
            data = load_data(data, val_split=cfg.val_split, seed=cfg.seed, classes=cfg.classes,
                             group_by=cfg.group_by, task=cfg.task)
        arch, model_kwargs = model_from_config(cfg.model)  # a layer list is checked when built
        in_chans = cfg.in_chans or data.channels
        if cfg.pretrained or cfg.weights:
            clf = cls.from_pretrained(arch, classes=data.classes, weights=cfg.weights, in_chans=in_chans,
                                      img_size=cfg.img_size, seed=cfg.seed, **model_kwargs)
        else:
            native = data.native_size if data.train is not None and (data.train.in_memory or data.train.streamed) \
                else None
            img_size = cfg.img_size or native or MODEL_DEFAULTS.get(arch, {}).get("img_size", 224)
            clf = cls.create(arch, classes=data.classes, in_chans=in_chans, img_size=img_size, seed=cfg.seed,
                             **model_kwargs)
        # decode settings travel in model.json: every later road maps a file as training did
        clf.preprocessing = dataclasses.replace(clf.preprocessing, intensity=cfg.intensity, bit_depth=cfg.bit_depth,
                                                frames=cfg.frames)
        return clf

    # ------------------------------------------------------------------ training
    def fit(self, data: Any, config: TrainConfig | dict[str, Any] | None = None, *,
            run_dir: str | Path | None = None, progress: bool = True, callbacks: list[Callback] | None = None,
            resume: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
        """Train on ``data`` (a folder, CSV/TSV manifest, .npz, dataset name, arrays or
        ImageData) with ``config`` (a TrainConfig; any of its keys can be given as keyword
        overrides, e.g. ``epochs=5``); keeps the weights of the best validation epoch and
        returns the training summary. With ``run_dir``, the model, ``history.csv`` and a
        ``checkpoint.pt`` are written there; ``resume`` (a loaded checkpoint) continues one.
        Under torchrun every process calls this (``batch_size`` is the global batch).
        Every option is documented on :class:`~imgcls.config.TrainConfig`."""
        session = TrainingSession(self, _config(config, overrides), run_dir=run_dir, progress=progress,
                                  callbacks=callbacks, resume=resume)
        summary = session.run(data)
        self.history = session.history
        return summary

    def find_lr(self, data: Any, config: TrainConfig | dict[str, Any] | None = None, *, steps: int = 100,
                start_lr: float = 1e-7, end_lr: float = 10.0, **overrides: Any) -> LRFindResult:
        """Learning-rate range test on a copy of this model (its weights stay as they are),
        on exactly the batches ``fit`` with the same config would train on."""
        session = TrainingSession(self, _config(config, overrides), progress=False)
        return session.find_lr(data, steps=steps, start_lr=start_lr, end_lr=end_lr)

    # ------------------------------------------------------------------ inference
    def predictor(self, backend: str = "torch", device: str = "auto", precision: str = "auto",
                  batch_size: int = 256, workers: int | None = None) -> Predictor:
        """The inference object every prediction goes through (backends, TTA, temperature)."""
        return Predictor(self, backend, device, precision, batch_size, workers)

    def eval_data(self, data: Any, split: str | None = None, strict: bool = False, cache: bool = True,
                  announce: bool = True) -> tuple[ImageData, str, Any, list]:
        """See :func:`imgcls.engine.predictor.eval_data`: the data, the split's name, the
        split decoded, the unreadable files."""
        return eval_data(self, data, split, strict=strict, cache=cache, announce=announce)

    def calibrate(self, data: Any, batch_size: int = 256, device: str = "auto", *, split: str = "val",
                  temperature: bool = True, coverage: float | None = None, conformal: str = "aps",
                  ood_method: str | None = None, accept: float = 0.95, fitted_on: str | None = None) -> dict[str, Any]:
        """Fit on the data's ``split`` (default: validation, held out as in training; give
        images training never saw): temperature scaling, so probabilities match accuracy
        (predicted classes do not change); with ``coverage``, split-conformal prediction sets
        (``conformal``: aps or lac, engine/conformal.py); with ``ood_method`` (msp, energy,
        knn), the "unknown" threshold accepting ``accept`` of these images (knn also stores
        the training split's features). ``save()`` stores all of it (model.json and, for
        knn, ood_features.safetensors), each with ``fitted_on`` (default: the split's name;
        training's ``--conformal`` hold-out passes ``"calib_split"``). Returns what was fitted
        (ECE/NLL before and after, ...)."""
        from imgcls.engine.trust_fit import fit_sets, fit_unknown
        from imgcls.engine.trust_names import FEATURE_METHODS, feature_kind, resolve_ood_method
        from imgcls.evaluation.calibration import temperature_scaling

        ood_method = resolve_ood_method(ood_method, self.multi_label)
        if self.multi_label:  # a sigmoid per label: no temperature, no sets; the unknown threshold works
            if coverage is not None:
                self.refuse_multi_label("conformal prediction sets (--coverage)")
            if ood_method is None:
                self.refuse_multi_label("temperature calibration")
            temperature = False
        _, name, part, _ = self.eval_data(data, split)
        name = fitted_on or name
        info: dict[str, Any] = {}
        with self.predictor(device=device, batch_size=batch_size) as p:
            logits, labels, feats = p.run_outputs(part, features=feature_kind(ood_method))
            if temperature:
                self.temperature, info = temperature_scaling(torch.from_numpy(logits), torch.from_numpy(labels))
                info["fitted_on"] = name
                self.card["calibration"] = dict(info)  # a copy: the sets and threshold below have sections of their own
            if coverage is not None:
                self.card["conformal"] = info["conformal"] = fit_sets(logits, labels, coverage, conformal,
                                                                      self.temperature, name)
            if ood_method is not None:
                train = _training_split(self, data, ood_method) if ood_method in FEATURE_METHODS else None
                self.card["ood"], stats = fit_unknown(p, logits, feats, ood_method, accept, name, train)
                self.ood_features, info["ood"] = stats, self.card["ood"]
        return info

    def evaluate(self, data: Any, split: str | None = None, batch_size: int = 256, device: str = "auto",
                 precision: str = "auto", strict: bool = False, cache: bool = True, announce: bool = True,
                 backend: str = "torch", ood: Any = None) -> dict[str, Any]:
        """Metrics on the split :meth:`eval_data` chooses (``split`` picks one). Unreadable
        image files are skipped and counted in ``skipped_files`` (``strict``: an error).
        With conformal sets in the card: ``conformal`` (coverage, mean set size, per class);
        with ``ood`` (other data): ``ood`` (AUROC, FPR95 of the OOD score, per method)."""
        from imgcls.engine.predictor import split_names
        from imgcls.evaluation.trust import trust_metrics

        data, split, part, skipped = self.eval_data(data, split, strict=strict, cache=cache, announce=announce)
        with self.predictor(backend, device, precision, batch_size) as p:
            logits, labels, feats = p.run_outputs(part)
            if self.multi_label:  # per-label OOD scores; no conformal sets
                m = multilabel_metrics(p.probabilities(logits), labels, self.classes, self.decision_thresholds())
            else:
                m = classification_metrics(torch.from_numpy(logits) / self.temperature, torch.from_numpy(labels),
                                           self.classes)
            # the held-in hint names only a split this data has ("all": evaluated whole, none other)
            have = split_names(data) if split != "all" else []
            m.update(trust_metrics(p, logits, labels, feats, ood, announce=announce, split=split, splits=have).sections)
        m["split"], m["data"] = split, data.name
        if skipped:
            m["skipped_files"] = [{"path": str(path), "reason": r} for _, path, r in skipped]
        return m

    def predict_proba(self, images: Any, batch_size: int = 64, device: str = "auto", precision: str = "auto",
                      workers: int | None = None, progress: bool = False, backend: str = "torch",
                      strict: bool = False) -> tuple[np.ndarray, list[str]]:
        """Class probabilities ``(N, num_classes)`` and the source name of each image.
        ``backend``: torch, onnx / onnx-int8 (the run's exports) or auto (engine/backends.py).
        An image file that cannot be read gets a row of NaN (``predict`` says why);
        ``strict``: an error naming it instead."""
        probs, sources, _, _ = self._proba(images, batch_size, device, precision, workers, progress, backend, strict)
        return probs, sources

    def _proba(self, images: Any, batch_size: int, device: str, precision: str, workers: int | None,
               progress: bool, backend: str, strict: bool, sets: bool | None = False,
               reject_unknown: bool | None = False) -> tuple[np.ndarray, list[str], dict[int, str], Any]:
        split, sources = as_split(images, self.preprocessing)
        skipped: dict[int, str] | None = None if strict else {}
        if self.preprocessing.frames == "all" and not split.in_memory:  # one row per frame of multi-frame files
            split, sources, unreadable = expand_frames(split, sources, self.preprocessing)
            if unreadable and strict:
                raise ImgclsError(next(iter(unreadable.values())), "fix or remove the file, or drop --strict")
            skipped = unreadable
        with self.predictor(backend, device, precision, batch_size, workers) as p:
            p.use_trust(sets, reject_unknown)  # required but missing: an error before any work
            logits, _, feats = p.run_outputs(split, progress=progress, skipped=skipped)
            probs, assessment = p.probabilities(logits), p.assess(logits, feats)
        if skipped:
            probs[sorted(skipped)] = np.nan  # a blank stand-in image went through the model: no prediction
        return probs, sources, skipped or {}, assessment

    def predict(self, images: Any, top_k: int = 1, batch_size: int = 64, device: str = "auto",
                precision: str = "auto", workers: int | None = None, progress: bool = False,
                backend: str = "torch", strict: bool = False, sets: bool | None = None,
                reject_unknown: bool | None = None) -> list[Prediction]:
        """Top-k classes for image files, folders (recursively), PIL images or arrays. A file
        that cannot be read gets a Prediction with ``error`` set and no classes (``strict``:
        an error naming it instead). Every Prediction has an ``ood_score``; with a fitted
        threshold, ``unknown`` (``label`` "unknown", ``guess`` the top class), with conformal
        sets, ``set``. ``sets`` / ``reject_unknown``: False switches them off, True requires
        them (an error naming ``imgcls calibrate`` when the model has none)."""
        check_top_k(top_k)  # before any image is read
        probs, sources, skipped, assessment = self._proba(images, batch_size, device, precision, workers, progress,
                                                          backend, strict, sets, reject_unknown)
        return decide(self.classes, probs, sources, top_k, skipped, assessment,
                      thresholds=self.decision_thresholds())

    def tune_thresholds(self, data: Any, target: str = "f1", batch_size: int = 256,
                        device: str = "auto") -> dict[str, Any]:
        """Per-class thresholds of a multi-label model, tuned on the data's validation split
        (held out as in training): ``target`` f1 (max F1), ``precision:0.9`` or ``recall:0.9``.
        ``save()`` (or ``imgcls thresholds``) stores them in model.json."""
        from imgcls.engine.multilabel import tune_thresholds

        if not self.multi_label:
            raise ImgclsError("per-class thresholds are for multi-label models; this one has one class per image",
                              "train on multi-label data (or with --task multi)")
        TrainConfig(threshold_target=target)  # validates the target
        _, _, part, _ = self.eval_data(data, "val")
        with self.predictor(device=device, batch_size=batch_size) as p:
            logits, labels = p.run(part)
            probs = p.probabilities(logits)
        self.card["thresholds"] = tune_thresholds(labels, probs, self.classes, target)
        return self.card["thresholds"]

    def predict_parts(self, images: Any, output: str | Path, fmt: str = "parquet", top_k: int = 1,
                      batch_size: int = 64, device: str = "auto", backend: str = "torch", workers: int | None = None,
                      strict: bool = False, progress: bool = True, sets: bool | None = None,
                      reject_unknown: bool | None = None) -> dict[str, Any]:
        """This process's part of a batch-prediction job over files, folders, a manifest or a
        shard set (one part file per rank under torchrun; see engine/batch_predict.py).
        ``sets`` / ``reject_unknown``: as in :meth:`predict`."""
        from imgcls.data.pipeline import prediction_split
        from imgcls.engine.batch_predict import predict_parts

        check_top_k(top_k)
        split, names = prediction_split(images, self.preprocessing)
        return predict_parts(self, split, names, output, fmt=fmt, top_k=top_k, batch_size=batch_size,
                             device=device, backend=backend, workers=workers, strict=strict, progress=progress,
                             sets=sets, reject_unknown=reject_unknown)

    def explain(self, images: Any, method: str = "gradcam", target: Any = None, layer: str | None = None,
                **opts: Any) -> list:
        """Heatmaps of what drove the predictions, with faithfulness scores: see
        :func:`imgcls.explain.explain` (methods: gradcam, gradcam++, ig, occlusion, lime, shap)."""
        from imgcls.explain import explain

        return explain(self, images, method=method, target=target, layer=layer, **opts)


def _training_split(clf: Classifier, data: Any, method: str = "knn") -> Any:
    try:
        return clf.eval_data(data, "train", announce=False)[2]
    except ImgclsError:
        raise ImgclsError(f"--ood-method {method} stores features of training images, and the calibration data has no "
                          "training split", "give the training data as --data (its validation split calibrates), "
                          "or use --ood-method energy") from None


def _config(config: TrainConfig | dict[str, Any] | None, overrides: dict[str, Any]) -> TrainConfig:
    base = config.model_dump() if isinstance(config, TrainConfig) else dict(config or {})
    return TrainConfig.from_dict({**base, **overrides}, source="Classifier.fit")
