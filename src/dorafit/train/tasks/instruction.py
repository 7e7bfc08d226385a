"""Instruction and chat tuning of a causal LM, evaluated by held-out loss and by what the model writes.

Data: a ``.jsonl`` or ``.parquet`` file or a Hub data set (:mod:`.records`) of Alpaca, OpenAI ``messages`` or ShareGPT records (:mod:`.conversations`), or the
``bbc-headlines`` preset (write the headline of a BBC News article). Held-out data: ``--eval-file``, or a seeded
``--test-size`` split. Conversations are rendered by the tokenizer's chat template, or by dorafit's default for
the record format (:mod:`dorafit.chat_format`); the loss covers the assistant turns only (every one of a
multi-turn conversation), or every token with ``--train-on-prompt``.

Evaluation, on up to ``--eval-limit`` held-out conversations:

* ``loss``, ``perplexity``: mean negative log-likelihood of the final responses' tokens given their prompts,
  and exp of it;
* ``rouge_l`` (ROUGE-L F1 of the ``rouge-score`` package, Porter stemming) and ``exact_match`` (equal after
  collapsing white space) of the greedy generation (up to ``--max-new-tokens``) against the final response.
  The (prompt, reference, generated) triples are returned under ``"samples"`` (the run folder's samples files).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...chat_format import ChatFormat, ChatFormatError, EncodeStats
from ...generation import SamplingOptions, generate_text
from .. import models
from . import conversations, records
from .base import DataError, TaskData, format_metrics, left_pad, limited, seeded_split
from .lm import causal_lm_loss, label_rows, token_losses
from .registry import register
from .rouge import rouge_l

METRICS = ("loss", "perplexity", "rouge_l", "exact_match")


def _normalise(text: str) -> str:
    return " ".join(text.split())


@register
class InstructionTask:
    kind = "instruction"
    images = False  # records without images (image-chat records: dorafit.train.tasks.image_chat)
    generative = True  # dorafit generate / chat prompt it with chat_format()
    has_head = False  # a freshly initialised head trains beside the adapter
    presets = {"bbc-headlines": "write the headline of a BBC News article (generation)"}

    def __init__(self, data: TaskData, tokenizer, cfg):
        self.data, self.tokenizer, self.max_length = data, tokenizer, cfg.max_length
        self.train_on_prompt = cfg.train_on_prompt
        self.max_new_tokens = cfg.max_new_tokens or data.extra["max_new_tokens"]
        self.format = ChatFormat.choose(tokenizer, conversations.DEFAULT_TEMPLATE[data.extra["format"]])
        self.stats = EncodeStats()
        encoded = [self.encode(e, self.train_on_prompt, self.stats) for e in data.train]
        for examples in data.test_sets().values():  # a test record the template cannot render fails now, not later
            for e in examples:
                self.encode(e)
        self.train = [(e.ids, e.trained, e.images) for e in encoded if e is not None]
        if not self.train:
            raise DataError(f"no training example of {data.name} fits --max-length {self.max_length}: "
                            f"{self.stats.describe()}")

    # ---- loading -------------------------------------------------------------------------------------------
    @classmethod
    def claims(cls, path: Path) -> bool:
        return conversations.claims(path, images=cls.images)

    @classmethod
    def load_data(cls, spec: str, cfg) -> TaskData:
        if spec == "bbc-headlines":
            train, test = seeded_split(conversations.bbc_headlines(), 0.1, cfg.split_seed)
            return TaskData("bbc-headlines", train, {"bbc-headlines": test}, max_length=256, duration=("epochs", 1),
                            eval_limit=100, extra={"format": "alpaca", "max_new_tokens": 32})
        path = records.source(spec)
        fmt, examples = conversations.read_file(path, images=cls.images)
        if cfg.eval_file:
            eval_fmt, test = conversations.read_file(records.source(cfg.eval_file), images=cls.images)
            if eval_fmt != fmt:
                raise DataError(f"{cfg.eval_file} holds {eval_fmt} records, {path} {fmt} records; use one format")
            train = examples
        else:
            train, test = seeded_split(examples, cfg.test_size, cfg.split_seed)
        name = records.name(path)
        return TaskData(name, train, {name: test}, max_length=512, duration=("epochs", 3),
                        extra={"format": fmt, "max_new_tokens": 64})

    @classmethod
    def load_model(cls, folder: Path, info: dict):
        return models.load_causal_lm(folder)

    def describe(self) -> str:
        return f"chat format: {self.format.describe()}; training data: {self.stats.describe()}"

    def stored(self) -> dict:
        """What a run folder keeps so that generation renders prompts as training did."""
        return {"chat_format": self.format.name, "chat_template": self.format.template}

    @classmethod
    def chat_format(cls, tokenizer, resolved: dict) -> ChatFormat:
        return ChatFormat(tokenizer, resolved["chat_format"], resolved["chat_template"])

    # ---- training ------------------------------------------------------------------------------------------
    def encode(self, example, train_on_prompt: bool = False, stats: EncodeStats | None = None):
        """:meth:`ChatFormat.encode` of one example (with ``images``: those it shows, in order); a template error
        names the example's file and line."""
        try:
            return self.format.encode(example.messages, self.max_length, train_on_prompt, stats)
        except ChatFormatError as exc:
            raise DataError(f"{example.source}: {exc}") from None

    def batch(self, rows: list[tuple[list[int], list[bool], list]]) -> dict[str, Tensor]:
        """Rows of (token ids, trained flags, images) as a left-padded batch with labels, plus the images'
        inputs (:meth:`image_inputs`)."""
        batch = label_rows([(ids, flags) for ids, flags, _ in rows], self.tokenizer.pad_token_id)
        batch.update(self.image_inputs([image for _, _, images in rows for image in images]))
        return batch

    def image_inputs(self, images: list) -> dict[str, Tensor]:
        """The model inputs of a batch's images, in order (none for a text task)."""
        return {}

    def loss(self, model, batch: dict[str, Tensor]) -> Tensor:
        return causal_lm_loss(model, batch)

    # ---- evaluation ----------------------------------------------------------------------------------------
    def _response_rows(self, examples) -> list[tuple[list[int], list[bool], list]]:
        """(ids, flags, images) with only the final response's tokens flagged, for the held-out loss."""
        rows = []
        for e in examples:
            enc = self.encode(e)
            if enc is not None:
                rows.append((enc.ids, [i >= enc.response_start for i in range(len(enc.ids))], enc.images))
        return rows

    @torch.no_grad()
    def held_out_loss(self, model, examples, device, batch_size: int) -> tuple[float, int]:
        """(mean NLL per response token, number of tokens)."""
        rows = sorted(self._response_rows(examples), key=lambda r: len(r[0]))
        total, count = 0.0, 0
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in self.batch(rows[start : start + batch_size]).items()}
            nll, mask = token_losses(model, batch)
            total += float(nll[mask].double().sum())
            count += int(mask.sum())
        return total / max(count, 1), count

    def prompt(self, example) -> tuple[list[int], list]:
        """(prompt tokens, the images they show): cut from the left (BOS kept) so that the generation fits
        --max-length."""
        return self.format.prompt_ids(example.prompt, max(1, self.max_length - self.max_new_tokens)), []

    def generate(self, model, examples, device, batch_size: int, progress: bool, name: str = "") -> list[str]:
        """Greedy completions of the examples' prompts, in the examples' order."""
        options = SamplingOptions(max_new_tokens=self.max_new_tokens)
        prompts, images = zip(*[self.prompt(e) for e in examples]) if examples else ((), ())
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
        texts: list[str] = [""] * len(prompts)
        for start in tqdm(range(0, len(order), batch_size), desc=f"generate {name}", leave=False,
                          disable=not (progress and len(order) > batch_size)):
            chunk = order[start : start + batch_size]
            inputs = self.image_inputs([image for i in chunk for image in images[i]])
            for i, text in zip(chunk, generate_text(model, self.tokenizer, [prompts[i] for i in chunk], options,
                                                    device=device, inputs=inputs)):
                texts[i] = text
        return texts

    def evaluate(self, model, device, limit: int | None, batch_size: int, progress: bool) -> dict:
        limit = limit if limit is not None else self.data.eval_limit
        per_task, samples = {}, []
        for name, examples in self.data.test_sets().items():
            examples = limited(examples, limit)
            loss, tokens = self.held_out_loss(model, examples, device, batch_size)
            generated = self.generate(model, examples, device, batch_size, progress, name)
            rouge = [rouge_l(e.reference, g) for e, g in zip(examples, generated)]
            exact = [_normalise(e.reference) == _normalise(g) for e, g in zip(examples, generated)]
            per_task[name] = {"loss": loss, "perplexity": math.exp(min(loss, 700)), "rouge_l": sum(rouge) / len(rouge),
                              "exact_match": sum(exact) / len(exact), "n": len(examples), "response_tokens": tokens}
            samples += [{"test_set": name, "prompt": self.format.render(e.prompt, add_generation_prompt=True),
                         "reference": e.reference, "generated": g, "rouge_l": r}
                        for e, g, r in zip(examples, generated, rouge)]
        return {"tasks": per_task, "samples": samples}

    @torch.no_grad()
    def check_outputs(self, model, examples: list, device) -> Tensor:
        """Next-token logits at the end of each prompt (N, V): the first token the model would write."""
        prompts = [self.prompt(e) for e in examples]
        batch = left_pad([ids for ids, _ in prompts], self.tokenizer.pad_token_id)
        batch.update(self.image_inputs([image for _, images in prompts for image in images]))
        batch = {k: v.to(device) for k, v in batch.items()}
        return model(**batch, logits_to_keep=1).logits[:, -1].float().cpu()

    def format_result(self, result: dict, before: dict | None = None) -> str:
        return format_metrics(result, before, METRICS)
