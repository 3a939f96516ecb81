"""Weight averaging during training: EMA of the weights (timm) and Lookahead."""

from __future__ import annotations

import torch
from torch import nn

from imgcls.engine.callbacks import Callback, TrainState

class EMA(Callback):
    """Exponential moving average of the weights (timm's ModelEmaV3, BatchNorm statistics
    included). Validation, best-model keeping and the final weights use the average: it is
    swapped into the model when an epoch's training ends and the live weights are swapped
    back when the next epoch starts. Decay warms up (timm's schedule) so short runs are
    not dominated by the random initial weights. Each fit starts a fresh average, and the
    model ends a fit on the average (the live weights of the last epoch are dropped), so an
    instance handed to a second fit (another module) carries nothing over."""

    def __init__(self, decay: float = 0.999):
        self.decay = decay
        self.ema = None
        self.model: nn.Module | None = None
        self._live: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, state: TrainState, model: nn.Module) -> None:
        from timm.utils import ModelEmaV3

        self.model, self._live = model, None  # (a resumed run's live weights are restored after this)
        self.ema = ModelEmaV3(model, decay=self.decay, use_warmup=True)

    def on_batch_end(self, state: TrainState) -> None:
        self.ema.update(self.model, step=state.step)

    def on_train_epoch_end(self, state: TrainState, model: nn.Module) -> None:
        self._live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.ema.module.state_dict())

    def on_epoch_start(self, state: TrainState) -> None:
        if self._live is not None:
            self.model.load_state_dict(self._live)
            self._live = None

    def on_fit_end(self, state: TrainState, model: nn.Module) -> None:
        self._live = None  # the fit ends on the average (or on BestModel's pick of the averages)

    # a checkpoint carries the average and, between epochs, the live weights swapped out
    def state_dict_for_checkpoint(self) -> dict:
        return {"ema": {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}, "live": self._live}

    def load_state_dict_from_checkpoint(self, d: dict) -> None:
        self.ema.module.load_state_dict(d["ema"])
        self._live = d["live"]


class Lookahead(Callback):
    """Lookahead (Zhang et al. 2019) with airbench's schedule: every ``every`` steps the slow
    weights move toward the live ones, ``slow = decay*slow + (1-decay)*live``, and training
    continues from the slow weights. ``decay`` rises as ``max_decay * (t/T)^3`` over the run
    (t: step, T: all steps), so early training moves freely and late training averages."""

    def __init__(self, every: int = 5, max_decay: float = 0.95 ** 5):
        self.every, self.max_decay = every, max_decay
        self.model: nn.Module | None = None
        self.slow: list[torch.Tensor] = []
        self.total = 1

    def _tensors(self) -> list[torch.Tensor]:
        # float parameters and BatchNorm running statistics (not the integer step counters)
        return [t for t in self.model.state_dict().values() if t.is_floating_point()]

    def on_fit_start(self, state: TrainState, model: nn.Module) -> None:
        self.model = model
        self.total = max(1, state.epochs * state.steps_per_epoch)
        self.slow = [t.detach().clone() for t in self._tensors()]

    @torch.no_grad()
    def _sync(self, decay: float) -> None:
        live = self._tensors()
        torch._foreach_lerp_(self.slow, live, 1.0 - decay)
        for t, s in zip(live, self.slow):
            t.copy_(s)

    def on_batch_end(self, state: TrainState) -> None:
        if state.step % self.every == 0:
            self._sync(self.max_decay * (state.step / self.total) ** 3)

    def state_dict_for_checkpoint(self) -> dict:
        return {"slow": [s.detach().cpu() for s in self.slow]}

    def load_state_dict_from_checkpoint(self, d: dict) -> None:
        for s, saved in zip(self.slow, d["slow"]):
            s.copy_(saved)

    def on_train_epoch_end(self, state: TrainState, model: nn.Module) -> None:
        if state.step >= self.total:  # the run's end: the model keeps the slow weights (airbench)
            self._sync(1.0)
