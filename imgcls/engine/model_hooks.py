"""Optional model hooks the loop calls: data-dependent initialisation (airbench's whitening
layer) and torch.compile."""

from __future__ import annotations

import torch
from torch import nn

from imgcls.data.transforms import Preprocessing

# set on a model once its data-dependent init ran, or when it starts from trained weights (a
# --pseudo-student teacher): a later fit keeps the weights the rest of the network learned on
INITIALISED = "initialised_from_data"


@torch.no_grad()
def init_from_data(model: nn.Module, batches, pre: Preprocessing, device: torch.device,
                   max_images: int = 5000) -> None:
    """Call the model's ``init_from_data(x)`` hook (e.g. airbench's whitening layer) with up
    to ``max_images`` normalised training images, if the model has one and has not had it
    (:data:`INITIALISED`)."""
    hook = getattr(model, "init_from_data", None)
    if not callable(hook) or getattr(model, INITIALISED, False):
        return
    split = batches.split
    if split.in_memory:
        x = split.images[:max_images]
    else:  # image files: the first few batches
        xs, n = [], 0
        for x, _ in batches:
            xs.append(x)
            n += len(x)
            if n >= max_images:
                break
        x = torch.cat(xs)[:max_images]
    hook(pre.normalize(x.to(device)))
    setattr(model, INITIALISED, True)


def start_from(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load trained weights into a fresh model that is about to be fit (a --pseudo-student
    teacher), and mark it :data:`INITIALISED` so the fit keeps them - airbench's whitening
    included - instead of re-initialising from its own data."""
    model.load_state_dict(state)
    setattr(model, INITIALISED, True)


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """The module to call in the loop: ``torch.compile(model)`` when asked (weights stay
    shared with ``model``, so state_dict / saving are unaffected), else ``model``."""
    if not enabled:
        return model
    return torch.compile(model)
