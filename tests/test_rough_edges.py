"""Rough edges a new user hit (issue 18): exporting a classification adapter folder, an adapter loaded into the
wrong model class, --init-from with another label set, --version, the default targets of a BERT model."""

from __future__ import annotations

import json

import pytest
import torch

import dorafit
from dorafit.cli import main

from .cli_support import assets, make_jsonl, run_cli  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, assets):  # noqa: F811
    run = tmp_path_factory.mktemp("cls") / "run"
    code, _, err = run_cli("train", "--model", assets["bert"], "--task", assets["jsonl"], "--steps", 3, "--lr", 3e-3,
                           "--batch-size", 8, "--no-eval-before", "--out", run)
    assert code == 0, err
    return run


def test_export_of_a_classification_adapter_folder(tmp_path, classifier_run, assets):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    meta = json.loads((classifier_run / "adapter" / "adapter_config.json").read_text())
    assert meta["model"] == {"class": "BertForSequenceClassification", "id2label": {"0": "neg", "1": "pos"}}
    for extra in ((), ("--base-model", assets["bert"])):
        out = tmp_path / f"peft{len(extra)}"
        code, printed, err = run_cli("export", classifier_run / "adapter", "--out", out, *extra)
        assert code == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and sorted(config["modules_to_save"]) == ["classifier", "pooler"]
    setup = dorafit.train.setup.load_trained(classifier_run, "cpu")
    base = AutoModelForSequenceClassification.from_pretrained(assets["bert"], num_labels=2)
    theirs = PeftModel.from_pretrained(base, out).eval()
    examples = setup.data.test["pairs"]
    torch.testing.assert_close(setup.task.check_outputs(theirs, examples, setup.device),
                               setup.task.check_outputs(setup.model.eval(), examples, setup.device),
                               rtol=1e-5, atol=1e-5)


def test_an_adapter_in_the_wrong_model_class_says_so_briefly(classifier_run, assets):  # noqa: F811
    from transformers import AutoModel

    model = AutoModel.from_pretrained(assets["bert"])
    with pytest.raises(dorafit.AdapterFileError) as info:
        dorafit.load_adapter(model, classifier_run / "adapter")
    msg = str(info.value)
    assert "does not fit this BertModel (it was saved on a BertForSequenceClassification)" in msg
    assert "this model names it 'encoder.layer." in msg
    assert len(msg) < 500 and "|" not in msg  # no regular expression of every module name
    assert not any(hasattr(m, "dorafit") for m in model.modules())


def test_init_from_reuses_the_head_only_for_the_same_labels(tmp_path, classifier_run, assets):  # noqa: F811
    same = tmp_path / "same"
    code, out, err = run_cli("train", "--model", assets["bert"], "--task", assets["jsonl"], "--init-from",
                             classifier_run / "adapter", "--steps", 1, "--no-eval-before", "--out", same)
    assert code == 0, err
    assert "--init-from: reused the adapter (10 modules) and its head (bert.pooler, classifier), trained for these " \
           "labels (neg, pos)" in out
    other = tmp_path / "other.jsonl"
    rows = [json.loads(line) for line in assets["jsonl"].read_text().splitlines()]
    other.write_text("".join(json.dumps({"text": r["text"], "label": {"pos": "good", "neg": "bad", }[r["label"]]})
                             + "\n" for r in rows))
    code, out, err = run_cli("train", "--model", assets["bert"], "--task", other, "--init-from",
                             classifier_run / "adapter", "--steps", 1, "--no-eval-before", "--out", tmp_path / "o")
    assert code == 0, err
    assert "not reused: its head (bert.pooler, classifier), trained for labels neg, pos, while this task has " \
           "labels bad, good: a fresh head is trained" in out
    three = tmp_path / "three.jsonl"
    make_jsonl(three)
    three.write_text(three.read_text() + json.dumps({"text": "so so", "label": "meh"}) + "\n")
    code, out, err = run_cli("train", "--model", assets["bert"], "--task", three, "--init-from",
                             classifier_run / "adapter", "--steps", 1, "--no-eval-before", "--out", tmp_path / "t",
                             "--test-size", 0.05)
    assert code == 0, err  # another label count: the head is fresh, no shape error
    assert "not reused: its head" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"dorafit {dorafit.__version__}"


def test_bert_default_targets_are_q_k_v_up_down(classifier_run):
    config = json.loads((classifier_run / "config.json").read_text())
    targets = config["config"]["targets"]
    assert len(targets) == 10 and not any("attention.output" in t for t in targets)
    roles = {".".join(t.split(".")[-2:]) for t in targets}
    assert roles == {"self.query", "self.key", "self.value", "intermediate.dense", "output.dense"}
