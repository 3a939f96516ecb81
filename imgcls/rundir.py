"""A run folder, the one object that reads and writes its files.

    runs/train/
      model.safetensors + model.json   the model (imgcls.artifact: safetensors + card)
      config.yaml                      the fully resolved training config
      metrics.json                     training summary + evaluation (+ calibration, report)
      history.csv, checkpoint.pt, skipped.csv

Every write is atomic (temporary file, fsync, rename), so a crash never leaves half a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcls.artifact import CARD, WEIGHTS, atomic_write, read_card, read_json
from imgcls.config import TrainConfig
from imgcls.errors import ImgclsError

CONFIG = "config.yaml"
METRICS = "metrics.json"
HISTORY = "history.csv"
SKIPPED = "skipped.csv"
CHECKPOINT = "checkpoint.pt"  # (engine/checkpoint.py writes it)
# what one training run writes: replaced together (--exist-ok), so no file of the last run stays
# beside the new one (an old checkpoint to resume, an old metrics.json section)
RUN_FILES = (WEIGHTS, CARD, CONFIG, METRICS, HISTORY, SKIPPED, CHECKPOINT)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2) + "\n"))


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ a new run into a named folder
    def has_model(self) -> bool:
        return (self.path / WEIGHTS).is_file()

    def claim(self, exist_ok: bool, replace: bool = True) -> None:
        """Before a new (not resumed) run writes here: a folder that holds a trained model is
        refused, or with ``exist_ok`` (and ``replace``) its run files are removed; other files
        (reports, exports) stay. ``replace=False``: only the refusal, before anything is loaded."""
        if not self.has_model():
            return
        if not exist_ok:
            raise ImgclsError(f"run folder {self.path} already holds a trained model ({WEIGHTS})",
                              "give another --name, or --exist-ok to replace it")
        if replace:
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ config.yaml
    def has_config(self) -> bool:
        return (self.path / CONFIG).is_file()

    def read_config(self) -> TrainConfig:
        if not self.has_config():
            raise ImgclsError(f"{self.path} is not a run folder (no {CONFIG})",
                              "give the folder `imgcls train` printed, e.g. --resume runs/train")
        return TrainConfig.from_yaml(self.path / CONFIG)

    def config_values(self) -> dict[str, Any]:
        """config.yaml as plain values ({} when absent or unreadable): for tools that only
        need a field or two of a run that may come from another imgcls version."""
        import yaml

        try:
            values = yaml.safe_load((self.path / CONFIG).read_text()) or {}
        except (OSError, yaml.YAMLError):
            return {}
        return values if isinstance(values, dict) else {}

    def write_config(self, cfg: TrainConfig) -> Path:
        """The resolved config; ``exist_ok`` is left out (saved False): it allowed this launch to
        replace the folder, and a run started again from this file asks again."""
        path = self.path / CONFIG
        saved = cfg.model_copy(update={"exist_ok": False})
        atomic_write(path, lambda p: saved.to_yaml(p))
        return path

    # ------------------------------------------------------------------ metrics.json
    def read_metrics(self) -> dict[str, Any]:
        path = self.path / METRICS
        if not path.is_file():
            return {}
        try:
            found = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # a damaged file is replaced by the next write, never a reason to stop
        return found if isinstance(found, dict) else {}

    def update_metrics(self, **sections: Any) -> Path:
        """Set ``sections`` in metrics.json, keeping what else it holds (the training
        summary beside the evaluation, the report beside both)."""
        metrics = self.read_metrics()
        metrics.update(sections)
        _write_json(self.path / METRICS, metrics)
        return self.path / METRICS

    # ------------------------------------------------------------------ model.json
    def read_card(self) -> dict[str, Any]:
        return read_card(self.path)

    def update_card(self, **fields: Any) -> None:
        """Change fields of model.json (weights untouched, so their sha256 still holds)."""
        path = self.path / CARD
        card = read_json(path, "the model card is damaged; retrain or restore it")
        card.update(fields)
        _write_json(path, card)


def metrics_file(path: str | Path) -> RunDir:
    """The RunDir whose metrics.json is ``path`` (reports may be written elsewhere)."""
    return RunDir(Path(path).parent)
