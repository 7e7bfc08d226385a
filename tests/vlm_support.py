"""A tiny random-weight LLaVA (transformers' LlavaConfig: a one-layer CLIP vision tower, a two-layer LLaMA) with
its processor, and small image-chat data sets: seconds to build, for the vision-language tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from .cli_support import CHATML, chat_tokenizer

pytest.importorskip("PIL")

IMAGE_SIDE = 16  # the vision tower's input: 16 x 16 pixels in 8 x 8 patches -> 4 image tokens (+1 CLS, dropped)
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def make_tiny_llava(folder: Path) -> Path:
    """A LLaVA whose processor expands ``<image>`` into 4 image tokens; the ChatML template."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = chat_tokenizer(CHATML)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"]})
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=IMAGE_SIDE, patch_size=8, projection_dim=16)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, image_token="<image>", chat_template=CHATML).save_pretrained(folder)
    return folder


def color_image(path: Path, name: str, seed: int = 0) -> Path:
    """A 20 x 20 PNG of one colour with a little noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(COLORS[name]) + rng.integers(-20, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_image_chat(folder: Path, n: int = 48, seed: int = 0, two_images_every: int = 6) -> Path:
    """``folder/chat.jsonl``: "What colour is it?" about one image (two in every ``two_images_every``-th record,
    asking for both colours), images under ``folder/images/``, paths relative to the file."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        names = [rng.choice(list(COLORS)) for _ in range(2 if two_images_every and i % two_images_every == 0 else 1)]
        paths = [color_image(folder / "images" / f"{i}_{k}.png", name, seed * 1000 + i * 2 + k)
                 for k, name in enumerate(names)]
        question = " ".join("<image>" for _ in names) + "\nWhat colour " + ("are they?" if len(names) > 1 else "is it?")
        rows.append({"messages": [{"role": "system", "content": "Name colours."},
                                  {"role": "user", "content": question},
                                  {"role": "assistant", "content": " and ".join(names)}],
                     "images": [str(p.relative_to(folder)) for p in paths]})
    path = folder / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
