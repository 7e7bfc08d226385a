"""The served model: a base causal LM with named adapters, each with the chat format it was trained with."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..chat_format import ChatFormat
from ..inject import unload
from ..multi import load_named_adapter
from ..train import hub, rundir
from ..train.models import load_causal_lm, resolve_model
from ..quantize import quantize_model
from ..train.quantized_load import LoadOptions, loading, quantized_layer_names
from ..train.setup import stored_config
from ..train.tasks import by_kind
from .api import Served
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


class AdapterLoader:
    """Adds named adapters to the served model and takes them away: at start (``--adapter``) and at run time
    (:mod:`.adapter_admin`, which calls :meth:`load` and :meth:`unload` in the engine's thread between steps)."""

    def __init__(self, net, base_folder: Path, tokenizer, base_format: ChatFormat, quantize: str | None):
        self.net, self.base_folder, self.tokenizer = net, base_folder, tokenizer
        self.base_format, self.quantize = base_format, quantize

    def source(self, name: str, path: Path) -> tuple[Path, ChatFormat]:
        """(adapter folder, chat format) of ``path``, checked against the served base (ValueError if not)."""
        return _adapter_source(name, path, self.base_folder, self.tokenizer, self.base_format, self.quantize)

    def load(self, name: str, folder: Path) -> None:
        load_named_adapter(self.net, folder, name)

    def unload(self, name: str) -> None:
        unload(self.net, name)


def runs_dtype(adapters: list[str]) -> str:
    """The ``--dtype`` the run folders among ``adapters`` trained in, if they agree; else float32."""
    dtypes = set()
    for text in adapters:
        _, path = parse_adapter_option(text)
        if rundir.is_run_folder(path):
            dtypes.add(stored_config(path)[0].dtype)
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def build_served(model: str, adapters: list[str], device: str = "cpu", dtype: str | None = None,
                 max_batch_size: int = 8, max_new_tokens: int = 256, quantize: str | None = None,
                 prefill_chunk: int = 256, pack_weights: bool = False) -> Served:
    """``dtype``: the base's (default: the runs', see :func:`runs_dtype`); adapters beside a bfloat16 or float16
    base stay float32. ``quantize``: the base read straight into quantized layers, shared by every adapter."""
    base_folder = resolve_model(model)
    dtype = dtype or runs_dtype(adapters)
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    with loading(LoadOptions(DTYPES[dtype], quantize, torch.device(device))):
        loaded = load_causal_lm(base_folder)
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
    return Served(engine, base_name, formats, sources, max_new_tokens, loader)
