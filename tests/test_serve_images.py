"""``dorafit serve`` with a vision-language base (a tiny random LLaVA): OpenAI ``image_url`` content parts, queried
with the official ``openai`` client. A chat request with a base64 PNG answers (greedy) what ``dorafit generate RUN
--image FILE`` writes; image and text requests on different adapters, batched together, each answer what they answer
alone; bad image parts get a 400 naming the part and the server stays up; remote URLs are refused unless allowed."""

from __future__ import annotations

import base64
import textwrap
import functools
import http.server
import io
import json
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from .cli_support import fails, run_cli
from .serve_support import start_server, stop_server
from .vlm_support import color_image, make_image_chat, make_tiny_llava

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

MAX_TOKENS = 8
QUESTION = "What colour is it?"
MAX_PIXELS = 2500  # the server's --max-image-pixels: 50 x 50


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A served tiny LLaVA with a DoRA run "a", a LoRA run "b" and a LoRA run "head" that also trained the
    projector in full, all of the image-chat task."""
    root = tmp_path_factory.mktemp("serve-images")
    llava = make_tiny_llava(root / "llava")
    data = make_image_chat(root / "data", n=24)
    runs = {}
    for name, options in (("a", ["--method", "dora"]), ("b", ["--method", "lora"]),
                          ("head", ["--method", "lora", "--head", "multi_modal_projector", "--targets", "q_proj"])):
        runs[name] = root / name
        code, _, err = run_cli("train", "--model", llava, "--task", data, *options, "--steps", 3, "--lr", 2e-2,
                               "--batch-size", 8, "--seed", 1, "--no-eval-before", "--eval-limit", 1,
                               "--max-new-tokens", 2, "--threads", 1, "--out", runs[name])
        assert code == 0, err
    images = {name: color_image(root / "images" / f"{name}.png", name, seed=7) for name in ("red", "blue", "green")}
    adapters = [a for name, run in runs.items() for a in ("--adapter", f"{name}={run}")]
    proc, url = start_server("--model", llava, "--port", 0, "--threads", 1, "--max-image-pixels", MAX_PIXELS,
                             *adapters, env={"OMP_NUM_THREADS": "1"})
    yield {"url": url, "runs": runs, "llava": llava, "images": images, "root": root}
    stop_server(proc)


def client(server):
    return openai.OpenAI(base_url=server["url"], api_key="none", max_retries=0, timeout=60)


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(api, model, content, **extra):
    answer = api.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                         max_tokens=MAX_TOKENS, temperature=0, **extra)
    return answer.choices[0].message.content


def generate(source, question, *images) -> str:
    args = [a for image in images for a in ("--image", image)]
    code, out, err = run_cli("generate", source, "--prompt", question, *args, "--max-new-tokens", MAX_TOKENS,
                             "--threads", 1)
    assert code == 0, err
    return out.strip()


def health(server) -> dict:
    with urllib.request.urlopen(server["url"].removesuffix("/v1") + "/health", timeout=30) as response:
        return json.loads(response.read())


def test_an_image_chat_request_answers_what_dorafit_generate_writes(server):
    api = client(server)
    red = server["images"]["red"]
    wrapped = "\n".join(textwrap.wrap(base64.b64encode(red.read_bytes()).decode(), 76))  # as GNU base64 writes it
    assert ask(api, "a", [image_part("data:image/png;base64," + wrapped), {"type": "text", "text": QUESTION}]) == \
        ask(api, "a", [image_part(data_url(red)), {"type": "text", "text": QUESTION}])
    for model, source in (("a", server["runs"]["a"]), ("head", server["runs"]["head"]), ("llava", server["llava"])):
        answers = {}
        for colour in ("red", "blue"):
            image = server["images"][colour]
            answers[colour] = ask(api, model, [image_part(data_url(image)), {"type": "text", "text": QUESTION}])
            assert answers[colour] == generate(source, QUESTION, image), (model, colour)
        assert answers["red"] != answers["blue"], "the image reaches the model"
    # two images, placed where the parts put them; <image> placeholders say the same to dorafit generate
    red, green = server["images"]["red"], server["images"]["green"]
    content = [{"type": "text", "text": "First "}, image_part(data_url(red)), {"type": "text", "text": " then "},
               image_part(data_url(green)), {"type": "text", "text": " colours?"}]
    assert ask(api, "b", content) == generate(server["runs"]["b"], "First <image>\n then <image>\n colours?", red,
                                              green)


def test_image_and_text_requests_on_different_adapters_batched_together_answer_as_alone(server):
    api = client(server)
    red, blue = (data_url(server["images"][c]) for c in ("red", "blue"))
    jobs = [("a", [image_part(red), {"type": "text", "text": QUESTION}]),
            ("b", "What colour is the sky?"),
            ("llava", [image_part(blue), {"type": "text", "text": QUESTION}]),
            ("b", [image_part(blue), image_part(red), {"type": "text", "text": "And these?"}]),
            ("a", [{"type": "text", "text": "What colour "}, {"type": "text", "text": "is grass?"}]),
            ("head", [image_part(red), {"type": "text", "text": QUESTION}])]
    alone = [ask(api, model, content) for model, content in jobs]
    assert len(set(alone)) > 2  # different answers: the adapters and the images differ
    with ThreadPoolExecutor(len(jobs) * 2) as pool:
        together = list(pool.map(lambda job: ask(api, *job), jobs * 2))
    assert together == alone * 2
    assert health(server)["peak_batch"] > 1  # requests that arrived together were generated together
    # text parts alone are the text: the same answer as a string content
    assert alone[4] == ask(api, "a", "What colour is grass?")


def test_an_image_request_reports_the_logprobs_of_its_tokens(server):
    api = client(server)
    content = [image_part(data_url(server["images"]["red"])), {"type": "text", "text": QUESTION}]
    answer = api.chat.completions.create(model="a", messages=[{"role": "user", "content": content}],
                                         max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=2)
    scored = answer.choices[0].logprobs.content
    assert scored and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in scored)
    assert scored[0].token == scored[0].top_logprobs[0].token  # greedy: the most likely token
    assert answer.usage.prompt_tokens > 4  # the image's 4 tokens count


def test_an_image_request_streams_the_answer_it_gives_whole(server):
    api = client(server)
    content = [image_part(data_url(server["images"]["blue"])), {"type": "text", "text": QUESTION}]
    chunks = list(api.chat.completions.create(model="b", messages=[{"role": "user", "content": content}],
                                              max_tokens=MAX_TOKENS, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ask(api, "b", content)


def png_bytes(side: int, noisy: bool = False) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3)) if noisy else np.full((side, side, 3), 90)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


BAD_PARTS = {  # part -> a piece of the 400's message
    "not base64": (image_part("data:image/png;base64,@@not base64@@"), "not valid base64"),
    "not an image": (image_part(b64(b"hello")), "not a readable image"),
    "truncated": (image_part(b64(png_bytes(40, noisy=True)[:300])), "not a readable image"),
    "too many pixels": (image_part(b64(png_bytes(60))), "60 x 60 pixels, more than this server's limit of 2500"),
    "not base64 data url": (image_part("data:image/png,abc"), "data:image/...;base64"),
    "remote": (image_part("http://127.0.0.1:9/cat.png"), "--allow-remote-images"),
    "file": (image_part("file:///etc/passwd"), "must be a data:image"),
    "no url": ({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}, "image_url part must be"),
    "unknown type": ({"type": "input_audio", "input_audio": {}}, "a content part must be"),
}


@pytest.mark.parametrize("case", list(BAD_PARTS))
def test_a_bad_image_part_gets_a_400_naming_it_and_the_server_stays_up(server, case):
    api = client(server)
    part, message = BAD_PARTS[case]
    content = [{"type": "text", "text": QUESTION}, part]
    with pytest.raises(openai.BadRequestError) as info:
        ask(api, "a", content)
    error = info.value.body
    assert message in error["message"] and error["param"] == "messages[0].content[1]", error
    assert health(server)["status"] == "ok"
    assert ask(api, "a", [image_part(data_url(server["images"]["red"]))]) is not None


def test_image_tokens_written_in_the_text_get_a_400(server):
    api = client(server)
    with pytest.raises(openai.BadRequestError, match="image_url part"):
        ask(api, "a", "<image>\nWhat colour is it?")
    with pytest.raises(openai.BadRequestError, match="image_url part"):
        api.completions.create(model="b", prompt="<image> colour", max_tokens=2)


def test_an_image_for_a_text_only_model_gets_a_400():
    from fastapi.testclient import TestClient

    from dorafit.serving.api import Served, create_app

    app = create_app(Served(engine=None, base_name="m", formats={}, adapters={}))  # a text-only model's server
    answer = TestClient(app).post("/v1/chat/completions", json={"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, image_part("data:image/png;base64,AAAA")]}]})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "messages[0].content[1]" and "reads text only" in error["message"]


def test_an_adapter_that_trains_a_language_model_module_in_full_is_refused(server, tmp_path):
    """A projector trained in full is the adapter's own (the "head" run above); a module of the language model
    trained in full cannot be: every row of a batch runs through the one shared language model."""
    import shutil

    folder = shutil.copytree(server["runs"]["head"] / "adapter", tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["config"]["extra_trainable"] = ["lm_head"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    line = fails("serve", "--model", server["llava"], "--adapter", f"x={folder}", "--port", 0)
    assert "trains lm_head in full" in line and "dorafit merge" in line


def test_a_model_whose_image_prefill_is_not_its_own_forward_is_refused(server, monkeypatch):
    """The check at load (a one-image prompt prefilled from embeddings == the model's forward from ids and pixels)
    passes for LLaVA and refuses a merge that differs (here: the image features left out)."""
    import torch

    from dorafit.serving import load
    from dorafit.serving.engine import Engine

    served = load.build_served(str(server["llava"]), [])
    assert served.images is not None
    monkeypatch.setattr(Engine, "_image_embeds", lambda self, request: self.model.get_input_embeddings()(
        torch.tensor([request.prompt])))
    with pytest.raises(ValueError, match="do not give the model's own outputs"):
        load.check_image_prefill(served.engine, served.images, "llava")


class _Images(http.server.BaseHTTPRequestHandler):
    def __init__(self, *args, files, **kwargs):
        self.files = files
        super().__init__(*args, **kwargs)

    def do_GET(self):  # noqa: N802 - http.server's name
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


QUESTION_PART = {"type": "text", "text": QUESTION}


def remote_answer(server, url: str) -> str:
    """Run "a"'s answer about the image at ``url`` from a server (in this process) with remote images allowed."""
    from fastapi.testclient import TestClient

    from dorafit.serving.api import create_app
    from dorafit.serving.images import ImageOptions
    from dorafit.serving.load import build_served

    served = build_served(str(server["llava"]), [f"a={server['runs']['a']}"], images=ImageOptions(allow_remote=True))
    served.engine.start()
    try:
        answer = TestClient(create_app(served)).post("/v1/chat/completions", json={
            "model": "a", "max_tokens": MAX_TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": [image_part(url), QUESTION_PART]}]})
    finally:
        served.engine.stop()
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["message"]["content"]


def test_remote_images_are_fetched_only_when_allowed(server):
    from dorafit.serving.errors import ApiError
    from dorafit.serving.images import ImageOptions, ImagePart, ImageReader
    from dorafit.train.vlm import load_processor
    from dorafit.train.vlm.inputs import ImageInputs

    red = server["images"]["red"].read_bytes()
    files = {"/red.png": red, "/big.png": png_bytes(40, noisy=True)}
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Images, files=files))
    threading.Thread(target=web.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{web.server_address[1]}"
    try:
        inputs = ImageInputs(load_processor(server["llava"]))
        allowed = ImageReader(inputs, ImageOptions(allow_remote=True, max_bytes=len(red)))
        (fetched,) = allowed.read([ImagePart(base + "/red.png", "p")])
        (inline,) = allowed.read([ImagePart(data_url(server["images"]["red"]), "p")])
        assert fetched.tobytes() == inline.tobytes() and fetched.size == (20, 20)
        for path, message in (("/big.png", f"larger than the server's limit of {len(red)} bytes"),
                              ("/missing.png", "HTTP 404")):
            with pytest.raises(ApiError, match=message) as info:
                allowed.read([ImagePart(base + path, "messages[0].content[0]")])
            assert info.value.status == 400 and info.value.param == "messages[0].content[0]"
        with pytest.raises(ApiError, match="--allow-remote-images"):
            ImageReader(inputs, ImageOptions()).read([ImagePart(base + "/red.png", "p")])
        # a server that allows them answers a remote image as the same image inline
        expected = ask(client(server), "a", [image_part(data_url(server["images"]["red"])), QUESTION_PART])
        assert remote_answer(server, base + "/red.png") == expected
    finally:
        web.shutdown()
    # the server started without --allow-remote-images refuses a URL its machine could fetch
    with pytest.raises(openai.BadRequestError, match="remote image URLs are not fetched"):
        ask(client(server), "a", [image_part(base + "/red.png")])
