"""Where models and data come from: Hugging Face Hub ids of models (ORG/NAME[@REVISION]) and data sets
(hf:ORG/NAME[:SPLIT]) read from fake offline caches, and Parquet files in every record format."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dorafit.serving.load import base_name_of
from dorafit.train.models import resolve_model
from dorafit.train.tasks import conversations, records
from dorafit.train.tasks.classification import read_text_label_file

from .cli_support import CHATML, assets, fails, make_chat_llama, make_jsonl, read_jsonl, run_cli  # noqa: F401 (fixture)
from .hub_support import COMMIT_A, COMMIT_B, cache_dataset, cache_model, offline_env, offline_hub  # noqa: F401

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("datasets")
FAST = ("--method", "lora", "--rank", 2, "--steps", 1, "--batch-size", 4, "--no-eval-before", "--eval-limit", 2,
        "--max-new-tokens", 2, "--threads", 1)


def to_parquet(rows: list[dict], path):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---- Parquet ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["alpaca", "messages", "sharegpt"])
def test_parquet_instruction_records_read_as_their_jsonl(assets, tmp_path, fmt):  # noqa: F811
    table = to_parquet(read_jsonl(assets[fmt]), tmp_path / f"{fmt}.parquet")
    found, examples = conversations.read_file(table)
    expected_fmt, expected = conversations.read_file(assets[fmt])
    assert found == expected_fmt == fmt
    assert [e.messages for e in examples] == [e.messages for e in expected]
    assert examples[2].source == f"{table}: row 3"


def test_parquet_text_label_records_read_as_their_jsonl(assets, tmp_path):  # noqa: F811
    rows = read_jsonl(assets["jsonl"])
    assert read_text_label_file(to_parquet(rows, tmp_path / "pairs.parquet")) == read_text_label_file(assets["jsonl"])
    numbered = to_parquet([{"text": r["text"], "label": int(r["label"] == "pos")} for r in rows], tmp_path / "n.parquet")
    assert {label for _, label in read_text_label_file(numbered)} == {"0", "1"}


def test_parquet_null_cells_are_missing_fields(tmp_path):
    rows = [{"instruction": "say hi", "input": None, "output": "hi"},
            {"instruction": "say", "input": "bye", "output": "bye"}]
    _, examples = conversations.read_file(to_parquet(rows, tmp_path / "alpaca.parquet"))
    assert examples[0].messages[0] == {"role": "user", "content": "say hi"}
    assert examples[1].messages[0] == {"role": "user", "content": "say", "input": "bye"}


@pytest.mark.parametrize("fmt,model", [("messages", "chatml_llama"), ("sharegpt", "chat_llama"),
                                       ("alpaca", "chat_llama"), ("jsonl", "bert")])
def test_train_on_parquet(assets, tmp_path, fmt, model):  # noqa: F811
    table = to_parquet(read_jsonl(assets[fmt]), tmp_path / f"{fmt}.parquet")
    run = tmp_path / "run"
    code, _, err = run_cli("train", "--model", assets[model], "--task", table, "--out", run, *FAST)
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["task"] == str(table) and config["resolved"]["kind"] == (
        "classification" if fmt == "jsonl" else "instruction")


def test_parquet_with_wrong_columns_is_one_line_naming_the_file_and_columns(assets, tmp_path):  # noqa: F811
    wrong = to_parquet([{"question": "q", "answer": "a"}] * 8, tmp_path / "qa.parquet")
    line = fails("train", "--model", assets["bert"], "--task", wrong, "--out", tmp_path / "r1")
    assert f"no task type reads {wrong}: its columns are question, answer;" in line
    line = fails("train", "--model", assets["bert"], "--task", assets["jsonl"], "--eval-file", wrong,
                 "--out", tmp_path / "r2")
    assert f"{wrong}: row 1: expected a record with \"text\" and \"label\"; its columns are question, answer" in line
    line = fails("train", "--model", assets["chat_llama"], "--task", assets["alpaca"], "--eval-file", wrong,
                 "--out", tmp_path / "r3")
    assert f"{wrong}: row 1: expected an instruction-tuning record" in line and "columns are question, answer" in line
    broken = tmp_path / "broken.parquet"
    broken.write_text("not parquet")
    assert f"{broken}: not a readable Parquet file" in fails("train", "--task", broken, "--out", tmp_path / "r4")
    folder = tmp_path / "folder.parquet"  # said "does not exist"
    folder.mkdir()
    assert f"data file {folder} is a folder; give a file (.jsonl, .parquet)" in fails(
        "train", "--model", assets["chat_llama"], "--task", assets["alpaca"], "--eval-file", folder,
        "--out", tmp_path / "r5")


# ---- models by Hub id ----------------------------------------------------------------------------------------
@pytest.fixture
def hub_models(offline_hub, tmp_path):  # noqa: F811
    """org/tiny: main -> commit A; tag v2 -> commit B (other weights)."""
    hub_cache = offline_hub / "hub"
    a = cache_model(hub_cache, "org/tiny", make_chat_llama, COMMIT_A, "main")
    b = cache_model(hub_cache, "org/tiny", lambda f: make_chat_llama(f, CHATML), COMMIT_B, "v2")
    return offline_hub, a, b


def test_hub_id_resolves_to_its_cached_snapshot_and_revision(hub_models, tmp_path, monkeypatch):
    _, a, b = hub_models
    assert resolve_model("org/tiny") == a
    assert resolve_model("org/tiny@main") == a
    assert resolve_model("org/tiny@v2") == b
    assert resolve_model(f"org/tiny@{COMMIT_B}") == b
    local = tmp_path / "here"
    make_chat_llama(local / "org" / "tiny")
    monkeypatch.chdir(local)  # a folder spelt like the id wins over the Hub
    assert resolve_model("org/tiny") == (local / "org" / "tiny").resolve()


def test_missing_hub_id_offline_is_one_line_saying_how_to_get_it(hub_models, assets):  # noqa: F811
    line = fails("train", "--model", "org/missing", "--task", assets["alpaca"], "--out", "unused")
    assert "model org/missing is not in the Hugging Face cache" in line and "HF_HUB_OFFLINE is set" in line
    assert "`hf download org/missing`" in line
    line = fails("train", "--model", "org/tiny@v9", "--task", assets["alpaca"], "--out", "unused")
    assert "model org/tiny at revision 'v9' is not in the Hugging Face cache" in line
    assert "hf download org/tiny --revision v9" in line
    line = fails("train", "--model", "gemma-3-27m", "--task", assets["alpaca"], "--out", "unused")
    assert "unknown model 'gemma-3-27m': not a preset" in line


def test_train_on_a_hub_id_pins_the_commit_for_later_commands(hub_models, assets, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    code, out, err = run_cli("train", "--model", "org/tiny@v2", "--task", assets["alpaca"], "--out", run, *FAST)
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["config"]["model"] == f"org/tiny@{COMMIT_B}"
    code, out, err = run_cli("generate", run, "--prompt", "red cat", "--max-new-tokens", 2)
    assert code == 0 and out.strip(), err
    code, out, err = run_cli("generate", "org/tiny", "--prompt", "red cat", "--max-new-tokens", 2)
    assert code == 0 and out.strip(), err
    prompts = to_parquet([{"prompt": "red cat", "instruction": None, "input": None},  # null cells: fields absent
                          {"prompt": None, "instruction": "say", "input": "dog"}], tmp_path / "p.parquet")
    code, out, err = run_cli("generate", run, "--prompts", prompts, "--out", tmp_path / "g.jsonl", "--max-new-tokens", 2)
    assert code == 0, err
    assert [set(r) for r in read_jsonl(tmp_path / "g.jsonl")] == [{"prompt", "generated"},
                                                                  {"instruction", "input", "generated"}]
    code, out, err = run_cli("export", run, "--out", tmp_path / "peft", "--check", 2)
    assert code == 0 and "checked: PEFT's outputs equal dorafit's" in out, err
    exported = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == "org/tiny"
    assert exported["revision"] == COMMIT_B  # the commit it trained on (was null: PEFT would load main, commit A)
    assert base_name_of("org/tiny@v2") == "org/tiny"  # what serve's clients call the base model


# ---- data sets by Hub id ---------------------------------------------------------------------------------------
@pytest.fixture
def hub_data(offline_hub, assets, tmp_path):  # noqa: F811
    """org/echo: the Alpaca assets as train (all) and test (the first 6); org/qa: columns question, answer."""
    rows = read_jsonl(assets["alpaca"])
    cache = offline_hub / "datasets"
    cache_dataset(cache, "org/echo", {"train": rows, "test": rows[:6]}, tmp_path / "echo-src")
    cache_dataset(cache, "org/qa", {"train": [{"question": "q", "answer": "a"}] * 8}, tmp_path / "qa-src")
    return offline_hub


def test_train_on_a_hub_dataset_with_its_test_split(hub_data, assets, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    code, _, err = run_cli("train", "--model", assets["chat_llama"], "--task", "hf:org/echo", "--eval-file",
                             "hf:org/echo:test", "--out", run, *FAST)
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["task"] == "hf:org/echo" and config["eval_file"] == "hf:org/echo:test"
    assert list(json.loads((run / "eval.json").read_text())["tasks"]) == ["echo"]
    src = records.source("hf:org/echo:test")
    assert [r.data for r in records.records(src)] == read_jsonl(assets["alpaca"])[:6]


def test_hub_dataset_errors_are_one_line(hub_data, assets):  # noqa: F811
    line = fails("train", "--model", assets["chat_llama"], "--task", "hf:org/nothing", "--out", "unused")
    assert "dataset org/nothing is not in the Hugging Face cache" in line and "HF_HUB_OFFLINE is set" in line
    assert "datasets.load_dataset('org/nothing')" in line
    line = fails("train", "--model", assets["chat_llama"], "--task", "hf:org/echo:validation", "--out", "unused")
    assert "dataset org/echo: Unknown split \"validation\"" in line
    line = fails("train", "--model", assets["bert"], "--task", "hf:org/qa", "--out", "unused")
    assert "no task type reads hf:org/qa:train: its columns are question, answer" in line
    line = fails("train", "--task", "hf:not-an-id", "--out", "unused")
    assert "a Hugging Face dataset is written hf:ORG/NAME[@REVISION][:SPLIT]" in line


def test_generate_prompts_from_a_hub_dataset_and_one_line_for_a_folder(hub_data, assets, tmp_path):  # noqa: F811
    """--prompts takes what --task takes (it said "hf:org/echo:test does not exist"), and a folder is named one."""
    out = tmp_path / "g.jsonl"
    code, _, err = run_cli("generate", assets["chat_llama"], "--prompts", "hf:org/echo:test", "--out", out,
                           "--max-new-tokens", 2)
    assert code == 0, err
    assert [r["instruction"] for r in read_jsonl(out)] == [r["instruction"] for r in read_jsonl(assets["alpaca"])[:6]]
    line = fails("generate", assets["chat_llama"], "--prompts", tmp_path)
    assert line == f"error: --prompts: data file {tmp_path} is a folder; give a file (.jsonl, .parquet)"
    assert "--prompts: data file" in fails("generate", assets["chat_llama"], "--prompts", tmp_path / "no.jsonl")


def test_command_line_reads_hf_home_and_offline_from_the_environment(hub_models, hub_data, assets, tmp_path):  # noqa: F811
    """A fresh process: HF_HOME and HF_HUB_OFFLINE=1 as a user sets them; model and data both by Hub id."""
    home = hub_data
    run = tmp_path / "run-env"
    done = subprocess.run([sys.executable, "-m", "dorafit", "train", "--model", "org/tiny", "--task", "hf:org/echo",
                           "--out", str(run), *map(str, FAST)], env=offline_env(home), capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "config.json").read_text())["config"]["model"] == f"org/tiny@{COMMIT_A}"


# ---- online failures and file selection, without a network ----------------------------------------------------
def hub_error(cls, status: int):
    import httpx2

    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/x")
    return cls(f"{status} error", response=httpx2.Response(status, request=request))


def test_each_hub_failure_is_one_sentence_saying_what_to_do():
    from huggingface_hub import errors

    from dorafit.train.hub import explain

    said = {name: str(explain(exc, "model", "org/x", rev)) for name, exc, rev in [
        ("gated", hub_error(errors.GatedRepoError, 403), None),
        ("missing", hub_error(errors.RepositoryNotFoundError, 404), None),
        ("unauthorized", hub_error(errors.HfHubHTTPError, 401), None),
        ("revision", hub_error(errors.RevisionNotFoundError, 404), "v9"),
        ("down", ConnectionError("connection refused"), None),
        ("server", hub_error(errors.HfHubHTTPError, 503), None)]}
    assert "org/x is gated: accept its terms at https://huggingface.co/org/x" in said["gated"]
    assert "has no model org/x, or it is private" in said["missing"] and "hf auth login" in said["missing"]
    assert "has no model org/x, or it is private" in said["unauthorized"]
    assert "org/x has no revision 'v9'" in said["revision"]
    assert "is not in the Hugging Face cache" in said["down"] and "`hf download org/x`" in said["down"]
    assert said["server"].startswith("cannot download model org/x from the Hugging Face Hub: 503 error")
    assert all("\n" not in line for line in said.values())


def test_bin_weights_are_fetched_only_without_safetensors(tmp_path, monkeypatch):
    """snapshot_download is asked for configs, tokenizer and safetensors; for *.bin only when none came."""
    import huggingface_hub

    from dorafit.train import hub

    calls = []

    def fake_snapshot(repo, revision=None, allow_patterns=None, ignore_patterns=None):
        calls.append(allow_patterns)
        folder = tmp_path / repo.replace("/", "--") / "snapshots" / COMMIT_A
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        if repo == "org/st":
            (folder / "model.safetensors").write_bytes(b"")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert hub.model_folder("org/st").name == COMMIT_A and len(calls) == 1 and "*.bin" not in calls[0]
    assert "*.safetensors" in calls[0] and "*.json" in calls[0]
    calls.clear()
    hub.model_folder("org/old")
    assert len(calls) == 2 and "*.bin" in calls[1]
    assert hub.pinned("org/st@main", tmp_path / "org--st" / "snapshots" / COMMIT_A) == f"org/st@{COMMIT_A}"
    assert hub.pinned("minilm", tmp_path) == "minilm"
