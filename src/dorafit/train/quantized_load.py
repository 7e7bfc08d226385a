"""Loading a model with its frozen base in ``--dtype``, its linear layers straight into quantized form.

    with loading(LoadOptions(torch.bfloat16, "nf4", device)):
        loaded = models.load_causal_lm(folder)        # reads the checkpoint into Linear4bit layers

:func:`from_pretrained_kwargs` is what ``transformers``' ``from_pretrained`` gets inside :func:`loading`.

bitsandbytes (nf4, fp4, int8): transformers' own loader with a ``BitsAndBytesConfig``. Chosen over dorafit reading
the safetensors files itself because transformers already builds the model on the meta device and reads the
checkpoint tensor by tensor (shards, renamed keys of older checkpoints, tied weights, every architecture it
knows), and with a bitsandbytes config quantizes each linear weight as it is read, on the device it is loaded to
(bitsandbytes 0.50 quantizes on the CPU too). A float copy of a layer exists only as the one tensor being read
(the checkpoint's values in ``--dtype``), never the model's float32 weights; writing that loop again would
duplicate transformers' key handling for nothing. The layers are the ones :func:`dorafit.quantize_model` makes
(4-bit: blocks of 64, double-quantized scales, compute in ``--dtype``; int8: LLM.int8, threshold 6.0), and
transformers leaves the output layer (and tied weights) in ``--dtype`` as dorafit does. transformers' 4-bit
blocks are always 64: a 4-bit layer whose input width 64 does not divide is read in ``--dtype`` (named to
transformers as a layer to skip) and then given :func:`dorafit.quantize_model`'s block size (32, or left in float
with a warning), so that every CPU reads its block scales alike (see :func:`dorafit.quantize.blocksize_for`).

Only causal LMs are read quantized: a classifier's head is the part of the model its checkpoint lacks, which
is known only after loading; classifiers are loaded in ``--dtype`` and quantized after (the head left out).

torchao NF4 (``--distributed fsdp --quantize nf4``: the base FSDP2 shards): transformers has no loader for it, so
the model is read in ``--dtype`` and each eligible linear weight is converted with torchao's ``to_nf4`` in
turn, its float weight freed before the next (:func:`torchao_nf4`): the base is held in ``--dtype`` for the
length of the load, once.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

#: torchao NF4's blocks: 64 weights per scale (QLoRA's), scales double-quantized in blocks of up to 256
NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256
#: an NF4 layer splits evenly into up to this many FSDP2 shards (along its rows, with whole scale blocks)
NF4_MAX_SHARDS = 8


@dataclass(frozen=True)
class LoadOptions:
    dtype: torch.dtype = torch.float32
    quantize: str | None = None  # nf4, fp4, int8 or None
    device: torch.device | None = None  # where bitsandbytes quantizes (None: the CPU)
    backend: str = "bitsandbytes"  # or "torchao" (nf4 only)


_CURRENT: contextvars.ContextVar[LoadOptions] = contextvars.ContextVar("dorafit_load_options", default=LoadOptions())


@contextlib.contextmanager
def loading(options: LoadOptions):
    """Models loaded by :mod:`dorafit.train.models` inside the block follow ``options``."""
    token = _CURRENT.set(options)
    try:
        yield options
    finally:
        _CURRENT.reset(token)


def current() -> LoadOptions:
    return _CURRENT.get()


def from_pretrained_kwargs(causal: bool) -> dict:
    """``from_pretrained`` keywords: the dtype, and for a causal LM with ``--quantize`` on bitsandbytes the
    quantization config and the device it quantizes on."""
    options = current()
    kwargs: dict = {"dtype": options.dtype}
    if causal and options.quantize and options.backend == "bitsandbytes":
        from ..quantize import require_bitsandbytes

        require_bitsandbytes(f"--quantize {options.quantize}")
        kwargs["quantization_config"] = bitsandbytes_config(options.quantize, options.dtype)
        kwargs["device_map"] = {"": str(options.device or torch.device("cpu"))}
    return kwargs


class LazyTensors(dict):
    """name -> safetensors slice, read on access. transformers' Auto classes deep-copy their keyword arguments;
    the open files cannot be copied and need not be: a copy is this same dict."""

    def __deepcopy__(self, memo):
        return self


def read_lazily(folder: Path) -> dict | None:
    """The folder's safetensors checkpoint as ``{name: slice}``, each tensor read with ``pread`` only when
    transformers asks for it (None: no safetensors checkpoint; transformers then reads what the folder has).

    transformers memory-maps safetensors files on Linux, and the mapping lives as long as any tensor it loaded
    unconverted: every page of the file it touched stays mapped into the process, quantized layers' included,
    so the process holds the whole file besides its own copies. Read with ``pread`` (the backend transformers
    itself uses on Windows), a tensor is copied into the process's own memory when it is loaded and nothing of
    the file stays behind."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    tensors = LazyTensors()
    for name in files:
        handle = safe_open(str(folder / name), framework="pt", device="cpu", backend="pread")
        tensors.update({key: handle.get_slice(key) for key in handle.keys()})
    return tensors


def load_causal_lm(folder: Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(folder)`` with the current options, the checkpoint read by
    :func:`read_lazily` where the folder holds safetensors (its config and generation config from the folder)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    kwargs.update(from_pretrained_kwargs(causal=True))
    lazily = read_lazily(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:  # transformers' own message
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    misaligned = skip_misaligned(kwargs.get("quantization_config"), config)
    if lazily is None:
        loaded = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    else:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        loaded = model_class.from_pretrained(None, config=config, state_dict=lazily, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    for module in model.modules():  # int8 layers do not record what they were quantized from: the load's dtype
        if type(module).__name__ == "Linear8bitLt":
            module.dorafit_float_dtype = current().dtype
    if misaligned:
        from ..quantize import quantize_model

        quantize_model(model, current().quantize, compute_dtype=current().dtype, only=misaligned)
    if lazily is not None:
        model.name_or_path = str(folder)
        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    return loaded


def skip_misaligned(quantization_config, config) -> list[str]:
    """For a 4-bit ``BitsAndBytesConfig``: the linear layers whose input width its blocks of 64 do not divide,
    added to the layers transformers leaves unquantized (with its own default ones, the output layer and tied
    weights); returns their names (found on a meta-device copy of the model, no memory)."""
    if quantization_config is None or not quantization_config.load_in_4bit:
        return []
    import copy
    import re

    from transformers import AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=current().dtype)  # config kept
    misaligned = [name for name, module in skeleton.named_modules()
                  if isinstance(module, nn.Linear) and module.in_features % 64]
    if misaligned:
        quantization_config.llm_int8_skip_modules = (get_keys_to_not_convert(skeleton)
                                                     + [f"^{re.escape(name)}$" for name in misaligned])
    return misaligned


def bitsandbytes_config(kind: str, dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for the layers :func:`dorafit.quantize.quantized_linear` makes."""
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)


def quantized_layer_names(model: nn.Module) -> list[str]:
    """The layers of ``model`` that hold a quantized weight (bitsandbytes or torchao)."""
    from ..layers import ops_for

    names = []
    for name, module in model.named_modules():
        ops = ops_for(module) if name else None
        if ops is not None and ops.quantized:
            names.append(name)
    return names


def scaler_block_size(numel: int) -> int | None:
    """NF4's scale-block size for a weight of ``numel`` elements: the largest power of two up to 256 that leaves
    the double-quantization factors splittable into :data:`NF4_MAX_SHARDS` shards; None if no size fits."""
    if numel % (NF4_BLOCK * NF4_MAX_SHARDS):
        return None
    scalers = numel // NF4_BLOCK // NF4_MAX_SHARDS
    size = NF4_SCALER_BLOCK
    while size > 1 and scalers % size:
        size //= 2
    return size


@torch.no_grad()
def torchao_nf4(model: nn.Module, skip: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The model's eligible linear layers (those of :func:`dorafit.quantize.quantizable_layers`) given torchao
    NF4 weights in place, one at a time; layers whose size NF4's blocks do not divide (or whose rows do not split
    into :data:`NF4_MAX_SHARDS`) stay as they are. Returns the names of the converted layers."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise ValueError("--quantize nf4 with --distributed fsdp uses torchao's NF4; install it with: "
                         "pip install 'dorafit[quant]'")
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    from ..memory import return_freed_memory
    from ..quantize import quantizable_layers

    names = []
    for name in quantizable_layers(model, skip):
        layer = model.get_submodule(name)
        size = scaler_block_size(layer.weight.numel())
        if size is None or layer.weight.shape[0] % NF4_MAX_SHARDS:
            continue
        layer.weight = nn.Parameter(to_nf4(layer.weight.detach().contiguous(), NF4_BLOCK, size), requires_grad=False)
        names.append(name)
    return_freed_memory()
    return names
