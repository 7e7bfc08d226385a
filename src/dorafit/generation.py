"""Text generation with an adapted (or merged, or plain) causal LM, through transformers' ``generate``.

An adapted model generates with its adapter unmerged: in eval mode each DoRA layer caches its norm vector, so a
generated token costs the base layer plus the low-rank product and one per-unit scale (see METHOD.md,
"DoRA at inference"). Greedy decoding (``temperature`` 0, the default) is deterministic and gives exactly the
merged model's tokens up to float rounding; sampling draws from ``softmax(logits / temperature)`` restricted to
the smallest set of tokens whose probability reaches ``top_p``, seeded by ``seed``. A temperature below
:data:`MIN_TEMPERATURE` means greedy: ``logits / T`` overflows as T goes to 0 (1e-45 gives infinities and NaN
probabilities), and its limit is the argmax.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass
from typing import Callable, Optional

from . import fields
from .fields import option

MIN_TEMPERATURE = 1e-5  # below it, sampling is greedy decoding (the limit T -> 0), as in vLLM
MAX_SEED = 2**64 - 1  # torch.Generator's seeds are 64-bit


def cli_label(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class SamplingOptions:
    """How tokens are chosen. Validated like every option (:mod:`dorafit.fields`)."""

    max_new_tokens: int = option(256, "most tokens to generate per prompt", minimum=1)
    temperature: float = option(0.0, "0: greedy (the most likely token); above 0: sample from softmax(logits / T)",
                                minimum=0)
    top_p: float = option(1.0, "sampling: keep the smallest set of tokens whose probability reaches top_p",
                          above=0, maximum=1)
    seed: Optional[int] = option(None, "seed of the sampler (default: not seeded)", minimum=0, maximum=MAX_SEED)
    label: InitVar[Optional[Callable[[str], str]]] = None  # how errors name a field (default: --max-new-tokens)

    def __post_init__(self, label) -> None:
        fields.check(self, label=label or cli_label)

    @property
    def greedy(self) -> bool:
        """True for greedy decoding: temperature 0, or below :data:`MIN_TEMPERATURE`."""
        return self.temperature < MIN_TEMPERATURE


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model's generation config's."""
    ids = []
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def generate_ids(model, tokenizer, prompts: list[list[int]], options: SamplingOptions, streamer=None,
                 device=None, inputs: dict | None = None) -> list[list[int]]:
    """The new tokens generated after each prompt (a batch, left-padded), up to the first stop token (kept out);
    ``model.generate`` runs without gradients. ``inputs``: more model inputs for the prompts (a vision-language
    model's ``pixel_values``, in the order of the prompts' image tokens)."""
    import torch  # here: the command line imports this module for SamplingOptions, and --help must not load torch

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, width - len(p):] = 1
    stops = stop_ids(model, tokenizer)
    sampling = {} if options.greedy else {"temperature": options.temperature, "top_p": options.top_p, "top_k": 0}
    if not options.greedy and options.seed is not None:
        torch.manual_seed(options.seed)
    try:
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=options.max_new_tokens, do_sample=not options.greedy, pad_token_id=pad,
            eos_token_id=stops or None, streamer=streamer, **sampling,
            **{key: value.to(device) for key, value in (inputs or {}).items()},
        )
    finally:
        model.train(was_training)
    result = []
    for row in out[:, width:].tolist():  # (B, new)
        cut = next((j for j, t in enumerate(row) if t in stops), len(row))
        result.append(row[:cut])
    return result


def generate_text(model, tokenizer, prompts: list[list[int]], options: SamplingOptions, streamer=None,
                  device=None, inputs: dict | None = None) -> list[str]:
    """:func:`generate_ids`, decoded without special tokens and stripped of surrounding white space."""
    ids = generate_ids(model, tokenizer, prompts, options, streamer=streamer, device=device, inputs=inputs)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
