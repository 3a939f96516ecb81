"""imgcls: labelled images in, a trained, evaluated and deployable classifier out."""

__version__ = "0.1.0"

from imgcls.api import Classifier, Prediction, TrainResult, train  # noqa: E402
from imgcls.config import TrainConfig  # noqa: E402
from imgcls.errors import ImgclsError  # noqa: E402

__all__ = ["Classifier", "ImgclsError", "Prediction", "TrainConfig", "TrainResult", "__version__", "train"]
