"""Instruction tuning end to end on a tiny LLaMA: train, eval, merge, generate, chat, resume, TensorBoard,
gradient checkpointing; and greedy generation with the adapter unmerged == with it merged."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from safetensors.torch import load_file

import dorafit
from dorafit.generation import SamplingOptions, generate_ids
from dorafit.train import runner
from dorafit.train.models import load_causal_lm
from dorafit.train.setup import enable_gradient_checkpointing

from .cli_support import assets, read_jsonl, run_cli  # noqa: F401 (fixture)
from .conftest import randomize_adapter

TRAIN = ("--method", "dora", "--rank", 4, "--lr", 1e-2, "--batch-size", 8, "--seed", 1, "--eval-limit", 4,
         "--max-new-tokens", 6, "--threads", 1)


def train(tmp_path, assets, fmt="messages", model="chatml_llama", name="run", *extra):  # noqa: F811
    run = tmp_path / name
    code, out, err = run_cli("train", "--model", assets[model], "--task", assets[fmt], "--out", run, *TRAIN, *extra)
    assert code == 0, err
    return run, out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, assets):  # noqa: F811
    """A DoRA instruction run (messages, model with a chat template) and its merged folder."""
    root = tmp_path_factory.mktemp("instruct-run")
    run, out = train(root, assets, "messages", "chatml_llama", "run", "--steps", 6)
    code, _, err = run_cli("merge", run, "--out", root / "merged")
    assert code == 0, err
    return {"run": run, "out": out, "merged": root / "merged", "root": root}


def test_run_folder_metrics_and_samples(trained):
    run, out = trained["run"], trained["out"]
    result = json.loads((run / "eval.json").read_text())
    metrics = result["tasks"]["messages"]
    assert set(metrics) >= {"loss", "perplexity", "rouge_l", "exact_match", "n"} and metrics["n"] == 4
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-6)
    assert 0 <= metrics["rouge_l"] <= 1 and 0 <= metrics["exact_match"] <= 1
    assert metrics["loss"] < result["before"]["tasks"]["messages"]["loss"]  # lr 1e-2 on an echo task
    for name in ("samples-before.jsonl", "samples.jsonl"):
        rows = read_jsonl(run / name)
        assert len(rows) == 4 and {"prompt", "reference", "generated", "rouge_l"} <= set(rows[0])
        assert rows[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert "chat format: the tokenizer's own chat template" in out and "perplexity" in out
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["kind"] == "instruction" and "<|im_start|>" in resolved["chat_template"]

    code, printed, err = run_cli("eval", run, "--json", trained["root"] / "again.json", "--samples",
                                 trained["root"] / "again.jsonl")
    assert code == 0, err
    again = json.loads((trained["root"] / "again.json").read_text())
    assert again["tasks"]["messages"]["rouge_l"] == metrics["rouge_l"]
    assert again["tasks"]["messages"]["loss"] == pytest.approx(metrics["loss"], rel=1e-5)
    assert [r["generated"] for r in read_jsonl(trained["root"] / "again.jsonl")] == \
        [r["generated"] for r in read_jsonl(run / "samples.jsonl")]


def test_generate_from_run_equals_generate_from_merged_folder(trained, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "red cat dog"}, {"messages": [{"role": "system", "content": "Echo."},
                                                     {"role": "user", "content": "big bird"}]},
            {"instruction": "Repeat the words.", "input": "small dog"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outputs = {}
    for source in ("run", "merged"):
        out = tmp_path / f"{source}.jsonl"
        code, _, err = run_cli("generate", trained[source], "--prompts", prompts, "--out", out,
                               "--max-new-tokens", 12)
        assert code == 0, err
        outputs[source] = read_jsonl(out)
    assert [r["generated"] for r in outputs["run"]] == [r["generated"] for r in outputs["merged"]]
    assert outputs["run"][0]["prompt"] == "red cat dog" and all(r["generated"] for r in outputs["run"])
    code, printed, err = run_cli("generate", trained["run"], "--prompt", "red cat dog", "--max-new-tokens", 12)
    assert code == 0, err
    assert printed.strip() == outputs["run"][0]["generated"]
    # the merged folder carries the chat template the run was trained with
    merged_tok = load_causal_lm(trained["merged"]).tokenizer
    assert "<|im_start|>" in merged_tok.chat_template


def test_chat_through_stdin_keeps_history_resets_and_exits(trained, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("red cat dog\nbig bird\n/reset\nred cat dog\n/exit\nnot read\n"))
    code, out, err = run_cli("chat", trained["run"], "--max-new-tokens", 12)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("chatting with run ") and "/reset" in lines[0]
    first, second, marker, again = lines[1:5]
    _, single, _ = run_cli("generate", trained["run"], "--prompt", "red cat dog", "--max-new-tokens", 12)
    assert first == single.strip() == again  # after /reset the same first turn gives the same answer
    assert marker == "(new conversation)" and len(lines) == 5
    messages = [{"role": "user", "content": "red cat dog"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "big bird"}]
    prompts = trained["root"] / "history.jsonl"
    prompts.write_text(json.dumps({"messages": messages}) + "\n")
    code, printed, err = run_cli("generate", trained["run"], "--prompts", prompts, "--max-new-tokens", 12)
    assert json.loads(printed)["generated"] == second  # the second answer saw the first exchange


def test_generative_commands_refuse_a_classification_run(tmp_path, assets):  # noqa: F811
    run = tmp_path / "cls"
    assert run_cli("train", "--model", assets["bert"], "--task", assets["jsonl"], "--steps", 1, "--out", run,
                   "--no-eval-before")[0] == 0
    for command in (("chat", run), ("generate", run, "--prompt", "hi")):
        code, _, err = run_cli(*command)
        assert code == 2 and err.count("\n") == 1 and "is a run of the classification task, not a generative one" in err


def test_greedy_generation_unmerged_equals_merged_in_float64(assets):  # noqa: F811
    loaded = load_causal_lm(assets["chat_llama"])
    model = loaded.model.double()
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=4, alpha=6, targets=["q_proj", "v_proj", "up_proj",
                                                                                    "down_proj", "o_proj"]))
    randomize_adapter(model, seed=3)
    merged = dorafit.merge_and_unload(copy.deepcopy(model))
    tok = loaded.tokenizer
    prompts = [tok("red cat")["input_ids"], tok("the big dog runs and sleeps")["input_ids"]]
    options = SamplingOptions(max_new_tokens=20)
    unmerged_ids = generate_ids(model, tok, prompts, options)
    assert unmerged_ids == generate_ids(merged, tok, prompts, options)
    assert any(len(row) > 0 for row in unmerged_ids)
    with dorafit.disabled(model):  # and the adapter matters
        assert generate_ids(model, tok, prompts, options) != unmerged_ids


def test_sampling_is_seeded_and_options_are_validated(assets):  # noqa: F811
    loaded = load_causal_lm(assets["chat_llama"])
    prompts = [loaded.tokenizer("red cat")["input_ids"]]
    sample = lambda seed: generate_ids(loaded.model, loaded.tokenizer, prompts,  # noqa: E731
                                       SamplingOptions(max_new_tokens=8, temperature=1.5, seed=seed))
    assert sample(4) == sample(4)
    with pytest.raises(ValueError, match="--temperature must be a number >= 0"):
        SamplingOptions(temperature=-1)
    code, _, err = run_cli("generate", assets["chat_llama"], "--prompt", "x", "--top-p", 0)
    assert code == 2 and "--top-p must be a number > 0 and <= 1, got 0" in err


def test_resume_after_a_crash_is_bit_for_bit(tmp_path, assets, monkeypatch):  # noqa: F811
    whole, _ = train(tmp_path, assets, "sharegpt", "chat_llama", "whole", "--steps", 8, "--dropout", 0.1,
                     "--checkpoint-every", 1, "--no-eval-before")
    real = runner.Run.after_step

    def crash_after_step_5(self, state):
        real(self, state)
        if state.step == 5:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(runner.Run, "after_step", crash_after_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path, assets, "sharegpt", "chat_llama", "broken", "--steps", 8, "--dropout", 0.1,
              "--checkpoint-every", 1, "--no-eval-before")
    monkeypatch.setattr(runner.Run, "after_step", real)
    broken = tmp_path / "broken"
    code, out, err = run_cli("train", "--resume", broken)
    assert code == 0, err
    assert "resumed from the checkpoint at step 5 of 8" in out
    a, b = load_file(whole / "adapter" / "adapter.safetensors"), load_file(broken / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [(r["step"], r["loss"], r["lr"]) for r in rows]  # noqa: E731
    assert strip(read_jsonl(broken / "metrics.jsonl")) == strip(read_jsonl(whole / "metrics.jsonl"))
    assert read_jsonl(broken / "samples.jsonl") == read_jsonl(whole / "samples.jsonl")


def test_tensorboard_logs_training_and_evaluation(tmp_path, assets):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = train(tmp_path, assets, "alpaca", "chat_llama", "run", "--steps", 3, "--log", "tensorboard")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/alpaca/rouge_l", "eval/alpaca/loss"} <= set(tags)
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in read_jsonl(run / "metrics.jsonl")], rel=1e-6)


def test_gradient_checkpointing_leaves_the_adapter_gradients_unchanged(assets):  # noqa: F811
    from dorafit.train.tasks.lm import causal_lm_loss, label_rows

    grads = []
    for checkpointing in (False, True):
        loaded = load_causal_lm(assets["chat_llama"])
        model = loaded.model.train()
        torch.manual_seed(0)
        dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=4, targets=["q_proj", "v_proj", "down_proj"]))
        randomize_adapter(model)
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        tok = loaded.tokenizer
        rows = [(tok("red cat dog runs")["input_ids"], [False, False, True, True, True, True]),
                (tok("big bird")["input_ids"], [False, True, True, True])]
        causal_lm_loss(model, label_rows(rows, tok.pad_token_id)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 18  # A, B, m of 3 modules x 2 layers
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-8, msg=name)


def test_gradient_checkpointing_option_trains(tmp_path, assets):  # noqa: F811
    run, out = train(tmp_path, assets, "alpaca", "chat_llama", "run", "--steps", 2, "--gradient-checkpointing",
                     "--no-eval-before")
    assert "gradient checkpointing" in out
    assert json.loads((run / "config.json").read_text())["config"]["gradient_checkpointing"] is True
