"""Vision-language models: image-chat records train a tiny random LLaVA (LoRA and DoRA, language-model
projections only), merge and export to PEFT with equal outputs, resume bit for bit, generate and chat with images;
bad image data is one error line."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dorafit.train.generator import load_generator

from .cli_support import fails, one_thread, read_jsonl, run_cli  # noqa: F401 (fixture)
from .vlm_support import color_image, make_image_chat, make_tiny_llava

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    model = make_tiny_llava(root / "llava")
    data = make_image_chat(root / "data")
    return {"root": root, "model": model, "data": data}


def train(vlm, out, *extra, method="dora", steps=8):
    code, stdout, err = run_cli("train", "--model", vlm["model"], "--task", vlm["data"], "--method", method,
                                "--steps", steps, "--batch-size", 4, "--lr", "1e-2", "--alpha", 12, "--out", out,
                                "--max-new-tokens", 6, *extra)
    assert code == 0, err
    return stdout


@pytest.fixture(scope="module")
def dora_run(vlm):
    run = vlm["root"] / "dora"
    train(vlm, run, "--head", "multi_modal_projector")
    return run


def test_training_lowers_the_loss_and_adapts_only_the_language_model(vlm, dora_run):
    for method, run in (("lora", vlm["root"] / "lora"), ("dora", dora_run)):
        if method == "lora":
            train(vlm, run, method="lora", steps=8)
        result = json.loads((run / "eval.json").read_text())
        after, before = result["tasks"]["chat"]["loss"], result["before"]["tasks"]["chat"]["loss"]
        assert after < before, (method, before, after)
        tensors = load_file(run / "adapter" / "adapter.safetensors")
        adapted = {k.rsplit(".", 1)[0] for k in tensors if "lora_A" in k}
        assert adapted and all(".language_model." in k for k in adapted), adapted
        assert len(adapted) == 2 * 5  # two layers: q, k, v, up, down
        projector = [k for k in tensors if "multi_modal_projector" in k]
        assert bool(projector) == (method == "dora")  # --head multi_modal_projector trains it in full
        assert not any("vision_tower" in k for k in tensors)


def test_merge_export_and_generation_agree(vlm, dora_run, tmp_path):
    code, out, err = run_cli("merge", dora_run, "--out", tmp_path / "merged")
    assert code == 0 and "predicts what the adapted model predicts" in out, err + out
    assert (tmp_path / "merged" / "processor_config.json").is_file()
    image = color_image(tmp_path / "q.png", "blue", 99)
    answers = []
    for source in (dora_run, tmp_path / "merged"):
        code, out, err = run_cli("generate", source, "--image", image, "--prompt", "What colour is it?",
                                 "--max-new-tokens", 6)
        assert code == 0, err
        answers.append(out)
    assert answers[0] == answers[1] and answers[0].strip()

    code, out, err = run_cli("export", dora_run, "--out", tmp_path / "peft")
    assert code == 0 and "PEFT's outputs equal dorafit's" in out, err + out
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    gen = load_generator(str(dora_run), "cpu")
    ids = gen.prompt([{"role": "user", "content": "<image>\nWhat colour is it?"}], [image])
    inputs = {"input_ids": torch.tensor([ids]), **gen.image_inputs([image])}
    base = AutoModelForImageTextToText.from_pretrained(vlm["model"])
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        ours, theirs = gen.model(**inputs).logits, peft_model(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())


def test_the_image_changes_the_answer_logits(vlm, dora_run, tmp_path):
    gen = load_generator(str(dora_run), "cpu")
    logits = []
    for name in ("red", "blue"):
        image = color_image(tmp_path / f"{name}.png", name, 1)
        ids = gen.prompt([{"role": "user", "content": "<image>\nWhat colour is it?"}], [image])
        assert gen.images.count(ids) == 4  # one image token per 8 x 8 patch of the 16 x 16 input
        with torch.no_grad():
            logits.append(gen.model(input_ids=torch.tensor([ids]), **gen.image_inputs([image])).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])


def test_stage_one_trains_only_the_projector(vlm, tmp_path):
    out = train(vlm, tmp_path / "align", "--targets", "none", "--head", "multi_modal_projector", method="lora", steps=3)
    assert "multi_modal_projector" in out, out  # the run's description names what trains
    tensors = load_file(tmp_path / "align" / "adapter" / "adapter.safetensors")
    assert tensors and all("multi_modal_projector" in k for k in tensors)
    code, out, err = run_cli("merge", tmp_path / "align", "--out", tmp_path / "aligned")
    assert code == 0, err
    merged = load_file(tmp_path / "aligned" / "model.safetensors")
    base = load_file(vlm["model"] / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)
    msg = fails("train", "--model", vlm["model"], "--task", vlm["data"], "--targets", "none", "--steps", 1,
                "--out", tmp_path / "nothing")
    assert "--targets none" in msg and "--head" in msg


def test_resume_is_bit_for_bit(vlm, tmp_path):
    options = ("--dropout", 0.1, "--schedule", "constant", "--warmup", 0, "--checkpoint-every", 1, "--no-eval-before")
    train(vlm, tmp_path / "whole", *options, steps=6)
    train(vlm, tmp_path / "stopped", *options, steps=3)
    (tmp_path / "stopped" / "eval.json").unlink()  # as if stopped after step 3
    shutil.rmtree(tmp_path / "stopped" / "adapter")
    code, out, err = run_cli("train", "--resume", tmp_path / "stopped", "--steps", 6)
    assert code == 0, err
    a = load_file(tmp_path / "whole" / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "stopped" / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda run: [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl")]  # noqa: E731
    assert losses(tmp_path / "whole") == losses(tmp_path / "stopped")


def test_a_long_conversation_drops_its_oldest_images_whole(vlm, dora_run):
    from dorafit.train.setup import load_trained
    from dorafit.train.tasks.conversations import Example

    task = load_trained(dora_run, "cpu").task
    images = [color_image(vlm["root"] / f"long{i}.png", "red", i) for i in range(3)]
    messages = [{"role": "user", "content": "<image> " + "word " * 30 + "<image> " + "word " * 30 + "<image> red?"},
                {"role": "assistant", "content": "red"}]
    task.max_length = 60
    encoded = task.encode(Example(messages, "test", images))
    assert len(encoded.ids) <= 60 and 0 < len(encoded.images) < 3
    assert task.inputs.count(encoded.ids) == 4 * len(encoded.images)  # each kept image has all its tokens
    assert encoded.images == images[3 - len(encoded.images):]  # the oldest went first


def test_a_chat_prompt_drops_images_its_context_no_longer_holds(dora_run, tmp_path):
    gen = load_generator(str(dora_run), "cpu")
    images = [color_image(tmp_path / f"old{i}.png", "red", i) for i in range(2)]
    messages = [{"role": "user", "content": "<image>\nWhat colour is it?"},
                {"role": "assistant", "content": "word " * 40},
                {"role": "user", "content": "<image>\nAnd this one?"}]
    ids, shown = gen.prompt_shown(messages, images, room=30)
    assert shown == images[1:] and gen.images.count(ids) == 4  # the first image went with the oldest text
    with pytest.raises(ValueError, match="does not fit the model's context with its 2 image"):
        gen.prompt(messages, images, room=30)  # generate: an image is never dropped silently
    ids, shown = gen.prompt_shown(messages, images)
    assert shown == images and gen.images.count(ids) == 8


def test_images_are_read_as_the_processor_expects(tmp_path):
    import numpy as np
    from PIL import Image

    from dorafit.train.tasks.record_images import load_rgb

    gray = np.full((8, 8), 40000, dtype=np.uint16)  # 16-bit: 40000 / 65535 of white
    Image.fromarray(gray).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert np.asarray(load_rgb(tmp_path / "g16.png")).mean() == pytest.approx(40000 / 257, abs=1)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # black, fully transparent: white after compositing
    rgba[:4, :, 3] = 255  # the top half opaque black
    Image.fromarray(rgba).save(tmp_path / "a.png")
    pixels = np.asarray(load_rgb(tmp_path / "a.png"))
    assert pixels.shape == (8, 8, 3) and (pixels[:4] == 0).all() and (pixels[4:] == 255).all()


def test_generate_names_bad_images_and_placeholder_counts(dora_run, tmp_path, monkeypatch):
    from PIL import Image

    image = color_image(tmp_path / "x.png", "red", 3)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "<image> and <image> which?", "images": [str(image)]}) + "\n")
    msg = fails("generate", dora_run, "--prompts", prompts)
    assert "2 <image> placeholder(s) but 1 image(s)" in msg
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # the 16 x 16 image is then a decompression bomb
    msg = fails("generate", dora_run, "--image", image, "--prompt", "which?")
    assert "not a readable image" in msg and "decompression bomb" in msg


def test_chat_shows_images(dora_run, tmp_path):
    from dorafit.commands.chat import chat
    from dorafit.generation import SamplingOptions

    gen = load_generator(str(dora_run), "cpu")
    image = color_image(tmp_path / "c.png", "green", 5)
    lines = iter([f"/image {image}", "What colour is it?", "/image /no/such.png", "And now?", None])
    written = []
    chat(gen, SamplingOptions(max_new_tokens=3), None, lambda: next(lines), written.append)
    text = "".join(written)
    assert "goes with your next line" in text and "error: " in text and "does not exist" in text


@pytest.mark.parametrize("damage, expected", [
    ("missing", "does not exist"), ("broken", "not a readable image"), ("extra placeholder", "placeholder"),
    ("not a list", "must be a list"),
])
def test_bad_image_records_are_one_error_line_naming_the_record(vlm, tmp_path, damage, expected):
    folder = tmp_path / "data"
    path = make_image_chat(folder, n=8)
    rows = read_jsonl(path)
    if damage == "missing":
        (folder / rows[3]["images"][0]).unlink()
    elif damage == "broken":
        (folder / rows[3]["images"][0]).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif damage == "extra placeholder":
        rows[3]["messages"][1]["content"] += " <image>"
    else:
        rows[3]["images"] = 7
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    msg = fails("train", "--model", vlm["model"], "--task", path, "--steps", 1, "--out", tmp_path / "run")
    assert "line 4" in msg and expected in msg, msg
    assert not (tmp_path / "run").exists()


def test_images_for_a_text_only_model_are_refused(vlm, tmp_path):
    from .cli_support import CHATML, make_chat_llama

    llama = make_chat_llama(tmp_path / "llama", CHATML)
    msg = fails("train", "--model", llama, "--task", vlm["data"], "--steps", 1, "--out", tmp_path / "run")
    assert "reads text only" in msg and "vision-language model" in msg
    msg = fails("generate", llama, "--image", vlm["data"].parent / "images" / "1_0.png", "--prompt", "hi")
    assert "reads text only" in msg


def test_parquet_records_with_image_bytes_train(vlm, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_jsonl(vlm["data"])[:12]
    folder = vlm["data"].parent
    table = pa.Table.from_pylist([{"messages": r["messages"],
                                   "images": [{"bytes": (folder / p).read_bytes(), "path": None} for p in r["images"]]}
                                  for r in rows])
    pq.write_table(table, tmp_path / "chat.parquet")
    code, out, err = run_cli("train", "--model", vlm["model"], "--task", tmp_path / "chat.parquet", "--steps", 1,
                             "--max-new-tokens", 2, "--out", tmp_path / "run")
    assert code == 0, err
    total = sum(len(r["images"]) for r in rows)
    shown = int(re.search(r"(\d+) training images", out).group(1))
    assert "image-instruction" in out and total - 2 <= shown <= total - 1  # one record (1 or 2 images) held out
