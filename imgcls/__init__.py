"""imgcls: labelled images in, a trained, evaluated and deployable classifier out."""

from imgcls.version import __version__
from imgcls.api import Classifier, Prediction  # noqa: E402
from imgcls.config import TrainConfig  # noqa: E402
from imgcls.errors import ImgclsError  # noqa: E402
from imgcls.runs import TrainResult, find_lr, train  # noqa: E402

__all__ = ["Classifier", "ImgclsError", "Prediction", "TrainConfig", "TrainResult", "__version__", "find_lr",
           "train"]
