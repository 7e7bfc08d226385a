"""What an image classifier expects of its input, and reading image files into it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from torch import Tensor

PREPROCESSOR_FILE = "preprocessor.json"  # dorafit's own record of the processor below
HF_PREPROCESSOR_FILE = "preprocessor_config.json"  # a transformers image processor's config, kept as it was


@dataclass
class ImageProcessor:
    """Images -> the model's input: ``size`` x ``size`` RGB, scaled to [0, 1], then ``(x - mean) / std`` per
    channel.

    It takes the tokenizer's place in a :class:`~dorafit.train.models.LoadedModel`: ``save_pretrained`` writes
    ``preprocessor.json`` beside the weights, plus the model's own ``preprocessor_config.json`` (``hf_config``)
    for a transformers model, so a merged folder stays usable with ``AutoImageProcessor``."""

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    hf_config: dict | None = field(default=None, repr=False)

    def __call__(self, pixels: Tensor) -> Tensor:
        """uint8 images (B, H, W) grayscale or (B, 3, H, W) RGB -> float (B, 3, size, size), normalised; other
        sizes are resized bilinearly, grayscale is copied to R, G and B."""
        x = pixels.float() / 255.0
        if x.dim() == 3:
            x = x.unsqueeze(1)  # (B, 1, H, W)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = x.expand(-1, 3, -1, -1)  # (B, 3, size, size)
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def save_pretrained(self, folder: Path) -> None:
        text = json.dumps({"size": self.size, "mean": list(self.mean), "std": list(self.std)}, indent=2) + "\n"
        (Path(folder) / PREPROCESSOR_FILE).write_text(text, encoding="utf-8")
        if self.hf_config is not None:
            text = json.dumps(self.hf_config, indent=2) + "\n"
            (Path(folder) / HF_PREPROCESSOR_FILE).write_text(text, encoding="utf-8")


def read_image(path: Path, size: int) -> np.ndarray:
    """The PNG or JPEG file ``path`` as uint8 RGB (3, size, size), resized bilinearly (Pillow); a ValueError
    naming the file if it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path} is not a readable PNG or JPEG image ({exc}); replace or remove it") from None
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def check_image(path: Path) -> None:
    """A ValueError naming ``path`` unless Pillow recognises it as a PNG or JPEG file with intact structure
    (``Image.verify``: cheap, without decoding every pixel)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            kind = image.format
            image.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path} is not a readable PNG or JPEG image ({exc}); replace or remove it") from None
    if kind not in ("PNG", "JPEG"):
        raise ValueError(f"{path} is a {kind} image, not PNG or JPEG; convert or remove it")
