"""dorafit analyze on tiny runs: CSV rows per run, step and layer; step 0 is the pretrained weight (dM = dD = 0);
the last snapshot's numbers equal the analysis of the run's final trained weights loaded another way."""

from __future__ import annotations

import csv
import json

import pytest

from dorafit import analysis
from dorafit.inject import merge_and_unload
from dorafit.train.models import load_classifier
from dorafit.train.setup import load_trained

from .cli_support import make_bert, make_jsonl, run_cli

METHODS = ("full", "lora", "dora")
STEPS, EVERY = 4, 2
LAYERS = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    bert, data = make_bert(root / "bert"), make_jsonl(root / "pairs.jsonl")
    folders = {}
    for method in METHODS:
        folders[method] = root / method
        code, _, err = run_cli("train", "--model", bert, "--task", data, "--method", method, "--steps", STEPS,
                               "--save-every", EVERY, "--batch-size", 8, "--lr", 1e-3 if method == "full" else 1e-2,
                               "--no-eval-before", "--out", folders[method])
        assert code == 0, err
    return {"root": root, "bert": bert, "data": data, **folders}


def read_rows(path):
    return list(csv.DictReader(open(path)))


def test_csv_rows_plot_and_summary(runs, tmp_path):
    out = tmp_path / "analysis"
    code, stdout, err = run_cli("analyze", *(runs[m] for m in METHODS), "--out", out, "--modules", "query", "value")
    assert code == 0, err
    rows = read_rows(out / "decomposition.csv")
    assert len(rows) == len(METHODS) * len(range(0, STEPS + 1, EVERY)) * len(LAYERS)
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        assert sorted({int(r["step"]) for r in mine}) == [0, 2, 4]
        assert sorted({r["layer"] for r in mine}) == sorted(LAYERS)
        for r in mine:
            if r["step"] == "0":  # the snapshot before training is the pretrained weight
                assert float(r["delta_m"]) == pytest.approx(0.0, abs=1e-12)
                assert float(r["delta_d"]) == pytest.approx(0.0, abs=1e-12)
            else:
                assert float(r["delta_m"]) > 0 and float(r["delta_d"]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["methods"]) == sorted(METHODS)
    for method in METHODS:
        s = summary["methods"][method]
        assert s["points"] == 2 * len(LAYERS) and s["steps"] == [2, 4]  # step 0 is left out of the fit
        assert -1.0 <= s["correlation"] <= 1.0
        assert s["paper_correlation"] == analysis.PAPER_CORRELATIONS[method]
        assert f"{method}" in stdout
    assert (out / "decomposition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", METHODS)
def test_last_snapshot_matches_the_trained_model(runs, tmp_path, method):
    """The last snapshot (step 4 = the end) against the run's own final adapter / model folder, merged."""
    points = analysis.run_points(runs[method], modules=["query", "value"])
    last = {p.layer: p for p in points if p.step == STEPS}
    setup = load_trained(runs[method])
    model = setup.model if method == "full" else merge_and_unload(setup.model)
    pretrained = load_classifier(runs["bert"], ["neg", "pos"]).model
    for layer in LAYERS:
        w0 = pretrained.get_submodule(layer).weight
        w = model.get_submodule(layer).weight
        dm, dd = analysis.decomposition_change(w0, w)
        assert last[layer].delta_m == pytest.approx(dm, rel=1e-6, abs=1e-9)
        assert last[layer].delta_d == pytest.approx(dd, rel=1e-6, abs=1e-12)


def test_default_modules_are_all_snapshot_modules(runs, tmp_path):
    code, _, err = run_cli("analyze", runs["dora"], "--out", tmp_path / "a", "--label", "DoRA r8")
    assert code == 0, err
    rows = read_rows(tmp_path / "a" / "decomposition.csv")
    layers = {r["layer"] for r in rows}
    # q, k, v, intermediate.dense and both output.dense (attention out, FFN down) of 2 layers
    assert len(layers) == 2 * 5 and all(r["method"] == "DoRA r8" for r in rows)  # q, k, v, up, down x 2 layers


def test_bad_input(runs, tmp_path):
    no_snapshots = tmp_path / "plain"
    code, _, err = run_cli("train", "--model", runs["bert"], "--task", runs["data"], "--method", "lora", "--steps", 1,
                           "--batch-size", 8, "--no-eval-before", "--out", no_snapshots)
    assert code == 0, err
    code, _, err = run_cli("analyze", no_snapshots, "--out", tmp_path / "a")
    assert code == 2 and "has no snapshots" in err and "--save-every" in err
    code, _, err = run_cli("analyze", runs["lora"], "--out", tmp_path / "a", "--modules", "qkv")
    assert code == 2 and "'qkv' matches none" in err and "query" in err
    code, _, err = run_cli("analyze", runs["lora"], runs["dora"], "--out", tmp_path / "a", "--label", "x")
    assert code == 2 and "one label per run" in err
    code, _, err = run_cli("analyze", tmp_path / "nowhere", "--out", tmp_path / "a")
    assert code == 2 and "not a dorafit run folder" in err
