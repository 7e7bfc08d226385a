"""The served model: a base causal LM or vision-language model with named adapters, each with the chat format it
was trained with."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch

from ..chat_format import ChatFormat
from ..adapted import is_adapted
from ..inject import find_modules, unload
from ..multi import load_named_adapter
from ..train import hub, rundir
from ..train.models import load_generative_model, resolve_model
from ..quantize import quantize_model
from ..train.quantized_load import LoadOptions, loading, quantized_layer_names
from ..train.setup import stored_config
from ..train.tasks import by_kind
from ..train.vlm import language_model_name
from ..train.vlm.inputs import ImageInputs
from .api import Served
from .images import ImageOptions, ImageReader
from .engine import Engine

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_adapter_option(text: str) -> tuple[str, Path]:
    """``NAME=DIR`` of ``--adapter``."""
    name, sep, path = text.partition("=")
    if not sep or not NAME.match(name) or not path:
        raise ValueError(f"--adapter {text!r}: expected NAME=DIR, NAME of letters, digits and . _ : / - (e.g. "
                         "--adapter headlines=runs/headlines)")
    return name, Path(path).expanduser()


def base_name_of(spec: str) -> str:
    """How clients name the base model: a preset's name, a Hub id's repository (``org/name``), or the folder's name."""
    return hub.repo_of(spec) or Path(spec).name or spec


def _adapter_source(name: str, path: Path, base_folder: Path, tokenizer, base_format: ChatFormat,
                    quantize: str | None):
    """(adapter folder, chat format) of a run folder, a dorafit adapter folder or a PEFT adapter folder."""
    if rundir.is_run_folder(path):
        cfg, resolved = stored_config(path)
        task_cls = by_kind(resolved.get("kind", "classification"))
        if cfg.method == "full":
            raise ValueError(f"--adapter {name}={path}: a full fine-tuning run has no adapter; serve its model "
                             f"folder with --model {path / rundir.MODEL}")
        if not task_cls.generative:
            raise ValueError(f"--adapter {name}={path}: a run of the {task_cls.kind} task, not a generative one")
        if resolve_model(cfg.model) != base_folder:
            raise ValueError(f"--adapter {name}={path} was trained on {cfg.model}, not on the served base model "
                             f"{base_folder}")
        if cfg.quantize != quantize:
            trained = f"quantized {cfg.quantize}" if cfg.quantize else "in float"
            served = f"--quantize {cfg.quantize}" if cfg.quantize else "without --quantize"
            raise ValueError(f"--adapter {name}={path} was trained on the base {trained}; serve it {served}")
        return path / rundir.ADAPTER, task_cls.chat_format(tokenizer, resolved)
    if (path / "adapter_config.json").is_file():
        return path, base_format
    raise ValueError(f"--adapter {name}={path}: neither a run folder of dorafit train nor an adapter folder "
                     "(dorafit's or PEFT's)")


def _trained_in_full(folder: Path) -> list[str]:
    """The modules an adapter folder trains in full beside its adapter, as its config names them: dorafit's
    ``extra_trainable`` (e.g. a VLM's projector trained with ``--head``), PEFT's ``modules_to_save``."""
    try:
        meta = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return []  # unreadable: loading it reports that
    config = meta.get("config") if isinstance(meta.get("config"), dict) else meta
    names = config.get("extra_trainable") or config.get("modules_to_save") or []
    return [names] if isinstance(names, str) else list(names)


class AdapterLoader:
    """Adds named adapters to the served model and takes them away: at start (``--adapter``) and at run time
    (:mod:`.adapter_admin`, which calls :meth:`load` and :meth:`unload` in the engine's thread between steps).

    Modules an adapter trained in full (a VLM's projector, ``--head multi_modal_projector``) would overwrite the
    ones the base and every other adapter share, so they are kept as the adapter's own (``own_modules``: adapter
    name -> {module name: module}), which the engine puts in place while it computes that adapter's image features
    (:meth:`.Engine._image_embeds`). That is possible only for modules the images alone pass through (the vision
    tower and the projector, not the language model); an adapter with others is refused: serve it merged."""

    def __init__(self, net, base_folder: Path, tokenizer, base_format: ChatFormat, quantize: str | None):
        self.net, self.base_folder, self.tokenizer = net, base_folder, tokenizer
        self.base_format, self.quantize = base_format, quantize
        self.own_modules: dict[str, dict[str, torch.nn.Module]] = {}

    def source(self, name: str, path: Path) -> tuple[Path, ChatFormat]:
        """(adapter folder, chat format) of ``path``, checked against the served base (ValueError if not)."""
        folder, fmt = _adapter_source(name, path, self.base_folder, self.tokenizer, self.base_format, self.quantize)
        self._own_module_names(name, path, folder)
        return folder, fmt

    def _own_module_names(self, name: str, path: Path, folder: Path) -> list[str]:
        """The full names of the modules the adapter in ``folder`` trained in full; ValueError if one of them is
        not on the image side of a vision-language model, or holds adapted layers."""
        trained = _trained_in_full(folder)
        if not trained:
            return []
        language = language_model_name(self.net)
        vision = language.rpartition(".")[0] if language else ""  # LLaVA: "model" holds the tower and projector
        try:
            names = find_modules(self.net, trained, "trained in full")
        except ValueError:
            names = []  # the loading reports the mismatch
        names = [n for n in names if not any(n.startswith(other + ".") for other in names)]
        for module_name in names:
            image_side = vision and module_name.startswith(vision + ".") and not (
                module_name == language or module_name.startswith(language + "."))
            if not image_side or any(is_adapted(m) for m in self.net.get_submodule(module_name).modules()):
                raise ValueError(f"--adapter {name}={path} trains {module_name} in full beside its adapter, and "
                                 "served adapters share the base's modules except a vision-language model's "
                                 "vision tower and projector; merge it (dorafit merge) and serve the merged folder "
                                 "with --model")
        return names

    def load(self, name: str, folder: Path) -> None:
        names = self._own_module_names(name, folder, folder)
        shared = {n: copy.deepcopy(self.net.get_submodule(n)) for n in names}  # as the base has them
        load_named_adapter(self.net, folder, name)  # copies the adapter's trained modules over the shared ones
        if names:
            self.own_modules[name] = {n: self.net.get_submodule(n) for n in names}
            for module_name, module in shared.items():
                self.net.set_submodule(module_name, module)

    def unload(self, name: str) -> None:
        unload(self.net, name)
        self.own_modules.pop(name, None)


def runs_dtype(adapters: list[str]) -> str:
    """The ``--dtype`` the run folders among ``adapters`` trained in, if they agree; else float32."""
    dtypes = set()
    for text in adapters:
        _, path = parse_adapter_option(text)
        if rundir.is_run_folder(path):
            dtypes.add(stored_config(path)[0].dtype)
    return dtypes.pop() if len(dtypes) == 1 else "float32"


@torch.no_grad()
def check_image_prefill(engine: Engine, reader: ImageReader, name: str) -> None:
    """ValueError unless the engine's prefill of an image prompt from input embeddings (:meth:`Engine._image_embeds`,
    causal attention, positions 0, 1, ...) gives the logits the model's own forward gives from its ids and pixels,
    on a one-image prompt: a vision-language model whose image prompts that prefill does not reproduce (e.g. one
    whose positions follow the image layout, as Qwen2-VL's) is refused rather than served wrong."""
    from PIL import Image

    from ..generation import SamplingOptions
    from .engine import Request

    inputs, net = reader.inputs, engine.model
    text = engine.tokenizer("What is it?", add_special_tokens=False)["input_ids"]
    image = Image.new("RGB", (64, 48), (200, 120, 40))
    ids = inputs.prompt([inputs.image_token_id, *text], [image])
    pixels = inputs.pixels([image], reader.dtype)
    try:
        tensor = torch.tensor([ids], device=engine.device)
        expected = net(input_ids=tensor, **{k: v.to(engine.device) for k, v in pixels.items()}).logits.float()
        embeds = engine._image_embeds(Request(ids, None, SamplingOptions(), images=pixels))
        got = net(inputs_embeds=embeds, position_ids=torch.arange(len(ids), device=engine.device)[None]).logits
    except Exception as exc:  # noqa: BLE001 - an architecture whose image inputs the engine cannot prepare
        raise ValueError(f"dorafit serve cannot read images for {name} ({type(net).__name__}): {exc}") from None
    scale = float(expected.abs().max())
    if not torch.allclose(got.float(), expected, rtol=1e-2, atol=1e-2 * scale):
        raise ValueError(f"dorafit serve cannot read images for {name} ({type(net).__name__}): its prompts with "
                         "images prefilled from input embeddings, causally, do not give the model's own outputs; "
                         "use dorafit generate --image for it")


def build_served(model: str, adapters: list[str], device: str = "cpu", dtype: str | None = None,
                 max_batch_size: int = 8, max_new_tokens: int = 256, quantize: str | None = None,
                 prefill_chunk: int | None = None, images: ImageOptions | None = None,
                 pack_weights: bool = False) -> Served:
    """``dtype``: the base's (default: the runs', see :func:`runs_dtype`); adapters beside a bfloat16 or float16
    base stay float32. ``quantize``: the base read straight into quantized layers, shared by every adapter.
    ``images``: how a vision-language base reads request images (default: :class:`ImageOptions`' defaults)."""
    base_folder = resolve_model(model)
    dtype = dtype or runs_dtype(adapters)
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    with loading(LoadOptions(DTYPES[dtype], quantize, torch.device(device))):
        loaded = load_generative_model(base_folder)
    tokenizer = loaded.tokenizer
    base_format = (ChatFormat(tokenizer, "model", tokenizer.chat_template) if tokenizer.chat_template
                   else ChatFormat.choose(tokenizer, "plain"))
    base_name = base_name_of(model)
    formats, sources = {base_name: base_format}, {}
    net = loaded.model.to(device).eval()
    if quantize and not quantized_layer_names(net):
        quantize_model(net, quantize)
    if DTYPES[dtype] in (torch.bfloat16, torch.float16):
        net.dorafit_adapter_dtype = torch.float32
    loader = AdapterLoader(net, base_folder, tokenizer, base_format, quantize)
    for text in adapters:
        name, path = parse_adapter_option(text)
        if name == base_name or name in sources:
            raise ValueError(f"--adapter {name}: the name is taken (the base model is {base_name!r}); give each "
                             "adapter its own name")
        folder, fmt = loader.source(name, path)
        loader.load(name, folder)
        formats[name], sources[name] = fmt, str(path)
    engine = Engine(net, tokenizer, max_batch_size=max_batch_size, prefill_chunk=prefill_chunk,
                    pack_weights=pack_weights)
    engine.own_modules = loader.own_modules  # adapters' own projectors (AdapterLoader), loaded at run time too
    reader = None
    if loaded.processor is not None:
        reader = ImageReader(ImageInputs(loaded.processor), images or ImageOptions(),
                             next(p.dtype for p in net.parameters() if p.is_floating_point()))
        check_image_prefill(engine, reader, base_name)
    return Served(engine, base_name, formats, sources, max_new_tokens, loader, images=reader)
