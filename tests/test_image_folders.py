"""Vision on your own data: image-folder tasks, Hugging Face image classifiers (tiny random ViT and ConvNeXt
configs saved in the test), Fashion-MNIST from a folder of one's own, and the one-line errors for bad files.

Images are a few dozen tiny PNG / JPEG files drawn here (two classes: reddish and bluish); every run is 1-2 steps
of a 2-layer model at 32 x 32 pixels on one CPU thread: seconds.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from .cli_support import one_thread, run_cli  # noqa: F401 (fixture)

pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

SIZE = 32


# ---- data and models built here ----------------------------------------------------------------------------
def draw(path: Path, color: tuple[int, int, int], seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    """A noisy image around ``color``, PNG or JPEG by the file's suffix."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color) + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def image_folder(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """``root/red/*.png`` and ``root/blue/*.jpg`` (sizes differ: the loader resizes), plus files it must skip."""
    for i in range(per_class):
        draw(root / "red" / f"r{i}.png", (200, 40, 40), seed + i, (40 + i, 30))
        draw(root / "blue" / f"b{i}.JPG", (40, 40, 200), seed + 100 + i, (28, 36))
    (root / "red" / ".DS_Store").write_bytes(b"\0")  # hidden: skipped
    (root / "README.txt").write_text("not in a class folder: skipped\n")
    return root


def make_vit(folder: Path) -> Path:
    """A 2-layer ViT for 32 x 32 images with a 5-way ImageNet-style head (the task's 2 classes need a new one)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, image_size=SIZE,
                    patch_size=8, num_labels=5)
    ViTForImageClassification(cfg).save_pretrained(folder)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.4, 0.5, 0.6],
                      image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return folder


def make_convnext(folder: Path) -> Path:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    cfg = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=SIZE, num_labels=5)
    ConvNextForImageClassification(cfg).save_pretrained(folder)
    return folder


def fashion_mnist_files(folder: Path, n_train: int = 5010, n_test: int = 10) -> Path:
    """Fashion-MNIST's four files in its IDX format (tiny images of zeros with a class-coloured first pixel): the
    preset holds 5,000 training images out for validation, so 5,010 leaves 10 to train on."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 0, 0] = labels * 25
        with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes(16) + images.tobytes())
        with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes(8) + labels.tobytes())
    return folder


TRAIN = ("--steps", 2, "--batch-size", 4, "--no-eval-before", "--threads", 1)


# ---- the data -------------------------------------------------------------------------------------------------
def test_image_folder_reads_classes_and_splits_by_seed(tmp_path):
    from dorafit.train.tasks import task_type
    from dorafit.train.tasks.base import DataError
    from dorafit.train.tasks.image_folder import load_image_folder

    folder = image_folder(tmp_path / "pics")
    assert task_type(str(folder)).kind == "image-classification"
    data = load_image_folder(folder, None, 0.25, split_seed=0)
    assert data.extra["labels"] == ["blue", "red"]  # the sub-folders, sorted
    assert len(data.train) == 9 and len(data.test["test"]) == 3
    files = {f.name for f, _ in data.train + data.test["test"]}
    assert files == {f"r{i}.png" for i in range(6)} | {f"b{i}.JPG" for i in range(6)}  # hidden/top-level skipped
    assert all(y == (0 if f.parent.name == "blue" else 1) for f, y in data.train)
    again = load_image_folder(folder, None, 0.25, split_seed=0)
    assert again.test["test"] == data.test["test"]
    assert load_image_folder(folder, None, 0.25, split_seed=1).test["test"] != data.test["test"]
    rare = folder / "green"  # one image: some seed holds it out, and the class could never be learnt
    draw(rare / "g.png", (40, 200, 40), 7)
    for seed in range(40):
        try:
            load_image_folder(folder, None, 0.25, split_seed=seed)
        except DataError as exc:
            assert str(exc) == (f"{folder}: class(es) green occur only in the held-out --test-size part (too few "
                                "examples), so they could never be learnt; add examples of them, lower --test-size "
                                "or try another --split-seed, or give an --eval-file")
            break
    else:
        pytest.fail("no split held out the one green image")


def test_images_are_decoded_resized_and_normalised_with_the_models_statistics(tmp_path):
    from dorafit.train.tasks.images import ImageClassificationTask
    from dorafit.train.vision import ImageProcessor, read_image

    path = draw(tmp_path / "a.png", (255, 0, 0), 0, (50, 20))
    pixels = read_image(path, SIZE).copy()
    assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == np.uint8
    processor = ImageProcessor(SIZE, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    task = ImageClassificationTask.__new__(ImageClassificationTask)
    task.processor = processor
    x = task.pixels([(path, 0)])
    expected = (torch.from_numpy(pixels).float() / 255 - torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1)) \
        / torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    torch.testing.assert_close(x[0], expected)


# ---- training on folders with Hugging Face image classifiers ------------------------------------------------------
def test_vit_on_an_image_folder_trains_evaluates_and_merges(tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model, pics, test_pics = make_vit(tmp_path / "vit"), image_folder(tmp_path / "pics"), image_folder(
        tmp_path / "test", per_class=2, seed=50)
    run, merged = tmp_path / "run", tmp_path / "merged"
    code, out, err = run_cli("train", "--model", model, "--task", pics, "--eval-file", test_pics, *TRAIN, "--out", run)
    assert code == 0, err
    # the paper's q, k, v, up, down under ViT's names, 2 layers; a fresh 2-way classifier trains beside them
    assert "dora r=8 alpha=16 on 10 modules (q_proj, k_proj, v_proj, fc1, fc2) + head classifier" in out
    result = json.loads((run / "eval.json").read_text())
    assert result["tasks"]["test"]["n"] == 4 and 0 <= result["tasks"]["test"]["accuracy"] <= 1
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["config"]["image_size"] == SIZE  # the model's own (config.json), since --image-size was not given

    code, out, err = run_cli("eval", run, "--json", tmp_path / "again.json", "--threads", 1)
    assert code == 0, err
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["tasks"]["test"]["correct"] == result["tasks"]["test"]["correct"]

    code, out, err = run_cli("merge", run, "--out", merged, "--check", 4)
    assert code == 0, err
    assert "checked: the merged model predicts what the adapted model predicts on 4" in out
    plain = AutoModelForImageClassification.from_pretrained(merged)  # plain transformers, no dorafit
    assert plain.config.id2label == {0: "blue", 1: "red"} and plain.classifier.out_features == 2
    assert list(AutoImageProcessor.from_pretrained(merged).image_mean) == [0.4, 0.5, 0.6]  # kept for plain use


def test_convnext_defaults_to_its_pointwise_convolutions_on_a_seeded_split(tmp_path):
    model, pics = make_convnext(tmp_path / "convnext"), image_folder(tmp_path / "pics")
    code, out, err = run_cli("train", "--model", model, "--task", pics, "--test-size", 0.25, "--method", "lora",
                             *TRAIN, "--out", tmp_path / "run")
    assert code == 0, err
    assert "lora r=8 alpha=16 on 4 modules (pwconv1, pwconv2) + head classifier" in out  # 2 stages x 1 layer
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["tasks"]["test"]["n"] == 3


def test_image_families_are_looked_up_by_folder_and_by_model(tmp_path):
    from dorafit.train import vision
    from dorafit.train.models import ModelError, default_targets, load_classifier

    vit = make_vit(tmp_path / "vit")
    family = vision.family_of_folder(vit)
    assert family.name == "transformers image classifier" and vision.default_image_size(vit) == SIZE
    model, processor, head = vision.load_image_classifier(vit, ["a", "b", "c"])
    assert head == ["classifier"] and model.classifier.out_features == 3 and processor.size == SIZE
    assert vision.family_of_model(model) is family
    assert default_targets(model) == ["q_proj", "k_proj", "v_proj", "fc1", "fc2"]
    _, _, head = vision.load_image_classifier(vit, [str(i) for i in range(5)])
    assert head == []  # the folder's classifier already has 5 classes: nothing new
    with pytest.raises(ModelError, match=r"is an image classifier \(ViTForImageClassification\)"):
        load_classifier(vit, ["a", "b"])
    assert vision.family_of_folder(tmp_path) is None


# ---- Fashion-MNIST from one's own folder -----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["option", "environment", "torchvision layout"])
def test_fashion_mnist_from_a_folder_of_ones_own(tmp_path, monkeypatch, how):
    from dorafit.train.tasks.images import FASHION_MNIST_ENV, fashion_mnist_dir, load_fashion_mnist

    root = tmp_path / "fm"
    files = fashion_mnist_files(root / "FashionMNIST" / "raw" if how == "torchvision layout" else root)
    option = ()
    if how == "environment":
        monkeypatch.setenv(FASHION_MNIST_ENV, str(root))
    else:
        option = ("--fashion-mnist-dir", root)
    assert fashion_mnist_dir(str(root)) == files
    data = load_fashion_mnist(0, None, files)
    assert (len(data.train), len(data.test["validation"]), len(data.test["test"])) == (10, 5000, 10)
    model = make_vit(tmp_path / "vit")
    code, out, err = run_cli("train", "--model", model, "--task", "fashion-mnist", *option, "--steps", 1,
                             "--batch-size", 2, "--eval-limit", 2, "--no-eval-before", "--threads", 1,
                             "--out", tmp_path / "run")
    assert code == 0, err
    assert set(json.loads((tmp_path / "run" / "eval.json").read_text())["tasks"]) == {"validation", "test"}


def test_missing_fashion_mnist_says_where_to_get_it(tmp_path):
    code, out, err = run_cli("train", "--model", make_vit(tmp_path / "vit"), "--task", "fashion-mnist",
                             "--fashion-mnist-dir", tmp_path / "nothing", "--out", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {tmp_path / 'nothing' / 'train-images-idx3-ubyte.gz'} does not exist")
    assert "--fashion-mnist-dir" in err and "torchvision.datasets.FashionMNIST" in err
    assert not (tmp_path / "run").exists()


# ---- bad input: one line naming the file ----------------------------------------------------------------------
def damaged(folder: Path) -> tuple[Path, str]:
    bad = folder / "red" / "r9.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return bad, f"error: {bad} is not a readable PNG or JPEG image"


def not_an_image(folder: Path) -> tuple[Path, str]:
    bad = folder / "blue" / "notes.txt"
    bad.write_text("hello")
    return bad, f"error: {bad} is not a PNG or JPEG file; a class folder holds only images"


def gif_named_png(folder: Path) -> tuple[Path, str]:
    bad = folder / "blue" / "b9.png"
    Image.new("RGB", (8, 8)).save(bad, format="GIF")
    return bad, f"error: {bad} is a GIF image, not PNG or JPEG"


def empty_class(folder: Path) -> tuple[Path, str]:
    (folder / "green").mkdir()
    return folder / "green", f"error: {folder / 'green'} is an empty class folder"


@pytest.mark.parametrize("spoil", [damaged, not_an_image, gif_named_png, empty_class])
def test_a_bad_file_is_one_error_line_naming_it(tmp_path, spoil):
    pics = image_folder(tmp_path / "pics")
    _, expected = spoil(pics)
    code, out, err = run_cli("train", "--model", tmp_path / "no-model-needed", "--task", pics,
                             "--out", tmp_path / "run")
    assert code == 2
    assert err.strip().startswith(expected) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_an_eval_folder_with_an_unknown_class_is_refused(tmp_path):
    pics, test_pics = image_folder(tmp_path / "pics"), image_folder(tmp_path / "test", per_class=1)
    draw(test_pics / "green" / "g0.png", (40, 200, 40), 7)
    code, out, err = run_cli("train", "--model", make_vit(tmp_path / "vit"), "--task", pics, "--eval-file", test_pics,
                             "--out", tmp_path / "run")
    assert code == 2
    assert err.strip() == (f"error: {test_pics}: class folder(s) green do not occur in the training folder {pics}")


def test_the_vision_families_sit_below_the_model_loader():
    """train/models.py looks the families up; no family module imports the loader (or a task) back."""
    import ast

    folder = Path(__file__).resolve().parent.parent / "src" / "dorafit" / "train" / "vision"
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:  # from ..x import y: outside vision/
                assert node.module == "model_errors", f"{path.name} imports ..{node.module}"
