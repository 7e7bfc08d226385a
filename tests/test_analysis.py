"""The weight-decomposition analysis on weights with known answers."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
from torch import nn

import dorafit
from dorafit import analysis

from .conftest import randomize_adapter


def _w0():
    return torch.randn(6, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_pure_rescale_has_no_direction_change():
    w0 = _w0()
    scale = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)[:, None]
    dm, dd = analysis.decomposition_change(w0, w0 * scale)
    assert dd == pytest.approx(0.0, abs=1e-12)
    assert dm == pytest.approx(((scale - 1).abs().squeeze() * w0.norm(dim=1)).mean().item(), rel=1e-12)


def test_pure_rotation_has_no_magnitude_change():
    w0 = _w0()
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    w = w0 @ q  # rotates every row, keeps its norm
    dm, dd = analysis.decomposition_change(w0, w)
    assert dm == pytest.approx(0.0, abs=1e-12)
    expected = (1 - (w0 * w).sum(1) / (w0.norm(dim=1) * w.norm(dim=1))).mean().item()
    assert dd == pytest.approx(expected, rel=1e-12) and dd > 0.1


def test_sign_flip_is_maximal_direction_change():
    w0 = _w0()
    dm, dd = analysis.decomposition_change(w0, -w0)
    assert dm == pytest.approx(0.0, abs=1e-12) and dd == pytest.approx(2.0, rel=1e-12)


def test_line_fit():
    slope, corr = analysis.line_fit([0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 5.0, 7.0])
    assert slope == pytest.approx(2.0) and corr == pytest.approx(1.0)
    slope, corr = analysis.line_fit([0.0, 1.0, 2.0], [2.0, 1.0, 0.0])
    assert slope == pytest.approx(-1.0) and corr == pytest.approx(-1.0)
    assert all(math.isnan(v) for v in analysis.line_fit([1.0], [2.0]))


@pytest.mark.parametrize("method", ["lora", "dora", "dvora"])
def test_effective_weights_equal_merged_weights(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    dorafit.apply(model, dorafit.AdapterConfig(method=method, r=2, targets=["0", "2"]))
    randomize_adapter(model)
    weights = analysis.effective_weights(model)
    merged = copy.deepcopy(model)
    dorafit.merge(merged)
    for name in ("0", "2"):
        torch.testing.assert_close(weights[name], merged.get_submodule(name).weight, rtol=1e-12, atol=1e-12)


def test_csv_and_plot(tmp_path):
    points = [
        analysis.Point(method, step, f"l{i}", dm, dd)
        for method, sign in (("lora", 1.0), ("dora", -1.0))
        for step in (10, 20)
        for i, (dd, dm) in enumerate([(0.1, 0.5 + sign * 0.1), (0.2, 0.5 + sign * 0.2), (0.3, 0.5 + sign * 0.3)])
    ]
    analysis.write_csv(points, tmp_path / "p.csv")
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 12 and rows[0]["method"] == "lora"
    summary = analysis.summarize(points)
    assert summary["lora"]["correlation"] == pytest.approx(1.0)
    assert summary["dora"]["correlation"] == pytest.approx(-1.0)
    assert summary["lora"]["within_step_correlation"] == pytest.approx(1.0)
    assert summary["dora"]["within_step_correlation"] == pytest.approx(-1.0)
    assert summary["lora"]["mean_dM"] == pytest.approx(0.7) and summary["dora"]["mean_dM"] == pytest.approx(0.3)
    assert summary["lora"]["mean_dD"] == summary["dora"]["mean_dD"] == pytest.approx(0.2)
    analysis.plot(points, tmp_path / "p.png", title="test")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_within_step_correlation_removes_the_shared_growth():
    """Every layer grows in dM and dD over steps (pooled correlation positive), while at each step the layers with
    more direction change have less magnitude change (within-step correlation -1)."""
    points = [analysis.Point("full", step, f"l{i}", step * (1.0 - 0.1 * i), step * (0.5 + 0.1 * i))
              for step in (1, 2, 3) for i in range(3)]
    s = analysis.summarize(points)["full"]
    assert s["correlation"] > 0.5
    assert s["within_step_correlation"] == pytest.approx(-1.0)
