"""Image classification data from folders: ``DIR/<class>/<image>.png|.jpg|.jpeg``, one sub-folder per class.

The class names are the sub-folder names, sorted. Files whose names start with a dot are skipped (``.DS_Store``),
and so are files directly in ``DIR``; any other file in a class folder that is not a PNG or JPEG image stops the
run with one line naming it, as does a damaged image (checked with Pillow before training; images are decoded
when a batch needs them). The test set is ``--eval-file DIR2`` of the same layout (its classes among the
training classes), or a seeded ``--test-size`` share of the images (``--split-seed``), as for text files.
"""

from __future__ import annotations

from pathlib import Path

from ..vision import check_image
from .base import DataError, TaskData, labelled_split

SUFFIXES = (".png", ".jpg", ".jpeg")


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def is_image_folder(path: Path) -> bool:
    """Whether ``path`` is a folder with at least one sub-folder holding a PNG or JPEG file (by name); a Hugging
    Face dataset source (``hf:...``, not a path) is not."""
    if not isinstance(path, Path) or not path.is_dir():
        return False
    return any(sub.is_dir() and any(f.suffix.lower() in SUFFIXES for f in sub.iterdir())
               for sub in path.iterdir())


def read_image_folder(folder: Path) -> dict[str, list[Path]]:
    """class name -> its image files (sorted), every file checked; a DataError naming what is wrong."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; an image task needs a folder with one sub-folder of PNG or JPEG "
                        "images per class")
    classes = {}
    for sub in _visible(folder):
        if not sub.is_dir():
            continue
        files = _visible(sub)
        for f in files:
            if f.is_dir() or f.suffix.lower() not in SUFFIXES:
                raise DataError(f"{f} is not a PNG or JPEG file; a class folder holds only images "
                                "(.png, .jpg, .jpeg): move it out")
            try:
                check_image(f)
            except ValueError as exc:
                raise DataError(str(exc)) from None
        if not files:
            raise DataError(f"{sub} is an empty class folder; add images of that class or remove the folder")
        classes[sub.name] = files
    if not classes:
        raise DataError(f"{folder} has no class folders; put the images of each class in a sub-folder named after "
                        "the class")
    return classes


def load_image_folder(folder: Path, eval_folder: str | None, test_size: float, split_seed: int) -> TaskData:
    """(image file, label index) examples of ``folder``, tested on ``eval_folder`` or a seeded split."""
    classes = read_image_folder(folder)
    labels = sorted(classes)
    if len(labels) < 2:
        raise DataError(f"{folder}: an image classification task needs at least 2 class folders, found {labels}")
    index = {name: i for i, name in enumerate(labels)}
    rows = [(f, index[name]) for name in labels for f in classes[name]]
    if eval_folder:
        test_classes = read_image_folder(Path(eval_folder).expanduser())
        unseen = sorted(set(test_classes) - set(labels))
        if unseen:
            raise DataError(f"{eval_folder}: class folder(s) {', '.join(unseen)} do not occur in the training folder "
                            f"{folder}")
        train, test = rows, [(f, index[name]) for name in sorted(test_classes) for f in test_classes[name]]
    else:
        train, test = labelled_split(rows, lambda row: labels[row[1]], test_size, split_seed, folder, "class(es)")
    return TaskData(folder.name, train, {"test": test}, max_length=2,  # reads no tokens: the smallest valid value
                    duration=("epochs", 3),
                    extra={"labels": labels})
