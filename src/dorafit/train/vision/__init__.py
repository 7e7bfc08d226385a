"""Image classifiers, as families the model loader looks up (:mod:`.registry`), one file each:
:mod:`.efficientnet` (the ``efficientnet-lite0`` preset) and :mod:`.transformers_family` (any folder
``AutoModelForImageClassification`` loads); :mod:`.processor` turns images into their input."""

from . import efficientnet, transformers_family  # noqa: F401 (registers the families)
from .processor import ImageProcessor, check_image, read_image
from .registry import (
    FAMILIES,
    default_image_size,
    family_of_folder,
    family_of_model,
    is_image_model_folder,
    load_image_classifier,
    preset_folders,
)

__all__ = ["FAMILIES", "ImageProcessor", "check_image", "default_image_size", "family_of_folder", "family_of_model",
           "is_image_model_folder", "load_image_classifier", "preset_folders", "read_image"]
