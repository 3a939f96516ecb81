from imgcls.data.datasets import DATASETS
from imgcls.data.decode import load_image
from imgcls.data.records import ImageData, Split
from imgcls.data.sources import from_arrays, from_folder, from_npz, load_data
from imgcls.data.transforms import AugmentSpec, Preprocessing

__all__ = ["DATASETS", "AugmentSpec", "ImageData", "Preprocessing", "Split", "from_arrays",
           "from_folder", "from_npz", "load_data", "load_image"]
