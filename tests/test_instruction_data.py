"""Instruction data: the three record formats, the chat templates, which tokens are trained, truncation and the
errors for bad records. Tiny LLaMA models with the MiniLM tokenizer (with and without a chat template)."""

from __future__ import annotations

import json

import pytest
import torch

from dorafit.chat_format import ChatFormat, ChatFormatError, EncodeStats
from dorafit.train.options import TrainConfig
from dorafit.train.setup import prepare
from dorafit.train.tasks import task_type
from dorafit.train.tasks.lm import alpaca_prompt

from .cli_support import CHATML, assets, chat_tokenizer, run_cli  # noqa: F401 (fixture)

CONVERSATION = [{"role": "system", "content": "Echo."}, {"role": "user", "content": "red cat"},
                {"role": "assistant", "content": "red cat"}, {"role": "user", "content": "big dog"},
                {"role": "assistant", "content": "dog"}]


def trained_text(tok, ids, flags) -> str:
    return tok.decode([i for i, f in zip(ids, flags) if f])


@pytest.mark.parametrize("fmt", ["alpaca", "messages", "sharegpt"])
@pytest.mark.parametrize("model", ["chat_llama", "chatml_llama"])
def test_each_format_trains_exactly_the_assistant_turns(assets, fmt, model):  # noqa: F811
    cfg = TrainConfig(model=str(assets[model]), task=str(assets[fmt]), method="lora", rank=2)
    setup = prepare(cfg)
    task, tok = setup.task, setup.loaded.tokenizer
    assert task.kind == "instruction" and task_type(str(assets[fmt])) is type(task)
    expected = {"chatml_llama": "model", "chat_llama": "alpaca" if fmt == "alpaca" else "plain"}[model]
    assert task.format.name == expected
    example = task.data.train[0]
    replies = [m["content"] for m in example.messages if m["role"] == "assistant"]
    ids, flags, images = task.train[0]
    assert images == []
    batch = task.batch([task.train[0], task.train[1]])
    row = batch["labels"][0]
    real = batch["attention_mask"][0].bool()
    assert torch.equal(batch["input_ids"][0][real], torch.tensor(ids))
    # prompt tokens (and padding) carry -100; the labelled tokens are exactly the assistant turns + end markup
    assert (row[~real] == -100).all()
    labelled = row[real][torch.tensor(flags)]
    assert torch.equal(labelled, torch.tensor(ids)[torch.tensor(flags)])
    assert (row[real][~torch.tensor(flags)] == -100).all()
    end = "<|im_end|>" if model == "chatml_llama" else "[SEP]"
    assert trained_text(tok, ids, flags).replace(" ", "") == "".join(r + end for r in replies).replace(" ", "")


def test_alpaca_default_template_is_the_alpaca_prompt():
    tok = chat_tokenizer()
    fmt = ChatFormat.choose(tok, "alpaca")
    for record in ({"role": "user", "content": "Say hi"}, {"role": "user", "content": "Say hi", "input": "to Bob"}):
        assert fmt.render([record], add_generation_prompt=True) == \
            "[CLS]" + alpaca_prompt(record["content"], record.get("input"))


def test_multi_turn_rendering_with_and_without_a_chat_template():
    plain = ChatFormat.choose(chat_tokenizer(), "plain")
    assert plain.render(CONVERSATION[:4], add_generation_prompt=True) == (
        "[CLS]<|system|>\nEcho.\n<|user|>\nred cat\n<|assistant|>\nred cat[SEP]\n<|user|>\nbig dog\n<|assistant|>\n")
    own = ChatFormat.choose(chat_tokenizer(CHATML), "plain")
    assert own.name == "model"
    assert own.render(CONVERSATION[:4], add_generation_prompt=True).endswith(
        "<|im_start|>user\nbig dog<|im_end|>\n<|im_start|>assistant\n")
    for fmt in (plain, own):
        pieces = fmt.pieces(CONVERSATION)
        assert [text.split("[SEP]")[0].split("<|im_end|>")[0] for text, trained in pieces if trained] == \
            ["red cat", "dog"]
        assert "".join(text for text, _ in pieces) == fmt.render(CONVERSATION)
        # the tokens a generation sees for the second turn are the training example's tokens before that turn
        enc = fmt.encode(CONVERSATION, 512)
        assert enc.ids[: enc.response_start] == fmt.prompt_ids(CONVERSATION[:4])


def test_truncation_cuts_the_prompt_from_the_left_first_then_the_response_and_counts():
    fmt = ChatFormat.choose(chat_tokenizer(), "plain")
    long_user = {"role": "user", "content": " ".join(["cat"] * 40)}
    convo = [long_user, {"role": "assistant", "content": "red dog"}]
    full = fmt.encode(convo, 1000)
    stats = EncodeStats()
    cut = fmt.encode(convo, 20, stats=stats)
    assert len(cut.ids) == 20 and cut.ids[0] == full.ids[0]  # BOS kept
    assert cut.ids[1:] == full.ids[len(full.ids) - 19:]  # the left of the prompt went first
    assert trained_text(fmt.tokenizer, cut.ids, cut.trained) == trained_text(fmt.tokenizer, full.ids, full.trained)
    assert (stats.prompt_cut, stats.response_cut, stats.skipped) == (1, 0, 0)
    response_len = len(full.ids) - full.response_start
    shorter = fmt.encode(convo, response_len, stats=stats)  # no room for any prompt token but BOS
    assert stats.response_cut == 1 and shorter.ids[0] == full.ids[0] and len(shorter.ids) == response_len
    assert fmt.encode(convo, 1, stats=stats) is None and stats.skipped == 1  # only BOS fits: skipped
    assert (stats.examples, stats.prompt_cut, stats.response_cut) == (3, 3, 2) and "1 skipped" in stats.describe()


def test_task_reports_truncation_and_skips(assets, tmp_path):  # noqa: F811
    path = tmp_path / "long.jsonl"
    rows = [{"instruction": "Repeat. " + " ".join(["cat"] * 60), "output": "cat"} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_cli("train", "--model", assets["chat_llama"], "--task", path, "--max-length", 40,
                             "--steps", 1, "--eval-limit", 2, "--max-new-tokens", 2, "--no-eval-before",
                             "--out", tmp_path / "run")
    assert code == 0, err
    assert "18 examples: 18 prompts cut from the left, 0 responses cut from the right, 0 skipped" in out


def bad(tmp_path, assets, lines: list, name="bad.jsonl") -> str:  # noqa: F811
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    code, out, err = run_cli("train", "--model", assets["chat_llama"], "--task", path, "--out", tmp_path / "run")
    assert code == 2, (out, err)
    lines_err = err.strip().splitlines()
    assert len(lines_err) == 1 and lines_err[0].startswith("error: "), err
    assert not (tmp_path / "run").exists()
    return lines_err[0]


def test_bad_instruction_records_name_the_file_the_line_and_the_fix(tmp_path, assets):  # noqa: F811
    alpaca = {"instruction": "a", "output": "b"}
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    msg = bad(tmp_path, assets, [alpaca, alpaca, chat])
    assert "bad.jsonl: line 3: a messages record, but line 1 is a alpaca record" in msg and "one format" in msg
    msg = bad(tmp_path, assets, [alpaca, {"instruction": "a"}])
    assert "line 2: the record has no \"output\"" in msg and "add one" in msg
    empty = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}
    msg = bad(tmp_path, assets, [chat, empty])
    assert "line 2: assistant turn 1 is empty" in msg
    open_end = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                             {"role": "user", "content": "c"}]}
    msg = bad(tmp_path, assets, [open_end])
    assert "line 1: the conversation ends with a 'user' turn" in msg and "must end with the assistant turn" in msg
    tool = {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "x"},
                         {"role": "assistant", "content": "b"}]}
    msg = bad(tmp_path, assets, [chat, tool])
    assert "line 2" in msg and "renders the roles system, user and assistant, not tool" in msg
    msg = bad(tmp_path, assets, [chat, "{not json"])
    assert "line 2: not valid JSON" in msg
    sharegpt = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]}
    msg = bad(tmp_path, assets, [sharegpt])
    assert "turn 1 of \"conversations\" must be an object with string \"from\" and \"value\"" in msg


def test_an_encoder_is_refused_for_a_causal_lm_task(tmp_path, assets):  # noqa: F811
    for task in (assets["alpaca"], assets["commonsense"]):
        code, _, err = run_cli("train", "--model", assets["bert"], "--task", task, "--out", tmp_path / "run")
        assert code == 2 and err.count("\n") == 1 and "is not a causal language model" in err, err
        assert "gemma-3-270m" in err and not (tmp_path / "run").exists()


def test_template_errors_during_rendering_are_chat_format_errors():
    with pytest.raises(ChatFormatError, match="a system message only as the first message"):
        ChatFormat.choose(chat_tokenizer(), "alpaca").render(CONVERSATION[1:3] + CONVERSATION[:1])
