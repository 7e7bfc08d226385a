"""The weight-decomposition analysis of the DoRA paper (section 3, Figure 2).

For a layer's weight W_t at training step t against the pretrained W0 (both [out, in]; for LoRA and DoRA the
merged weight), with k output units j:

    dM_t = (1/k) * sum_j | ||W_t[j]|| - ||W0[j]|| |          magnitude change
    dD_t = (1/k) * sum_j (1 - cos(W_t[j], W0[j]))             direction change

Plotting dD (x) against dM (y), one point per layer per checkpoint, the paper finds a negative slope for full
fine-tuning (correlation -0.62) and DoRA (-0.31), and a positive one for LoRA (+0.83).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import functional as Fn
from .files import atomic_write_bytes, atomic_write_text
from .inject import adapted_modules

#: the paper's correlations on VL-BART query/value (section 3)
PAPER_CORRELATIONS = {"full": -0.62, "dora": -0.31, "lora": 0.83}


@dataclass(frozen=True)
class Point:
    """One layer at one checkpoint."""

    method: str
    step: int
    layer: str
    delta_m: float
    delta_d: float


def decomposition_change(w0: Tensor, w: Tensor) -> tuple[float, float]:
    """(dM, dD) of ``w`` against ``w0``, both [out, in] (any layout flattened per output unit), in float64."""
    w0 = w0.detach().flatten(1).double()
    w = w.detach().flatten(1).double()
    n0, n = w0.norm(dim=1), w.norm(dim=1)
    delta_m = (n - n0).abs().mean().item()
    cos = (w0 * w).sum(dim=1) / (n0 * n).clamp_min(torch.finfo(torch.float64).tiny)
    delta_d = (1.0 - cos).mean().item()
    return delta_m, delta_d


@torch.no_grad()
def effective_weights(model: nn.Module) -> dict[str, Tensor]:
    """The merged weight matrix [out, in] of every adapted layer, computed by the same function merge uses."""
    result = {}
    for name, layer in adapted_modules(model):
        st = layer.dorafit
        w0 = st.ops.weight_matrix(layer)
        if st.merged:
            result[name] = w0.detach().clone()
            continue
        p, q = layer.factors()
        m = layer.magnitude if st.decomposed else None
        n = layer.weight_norm(p, q) if st.decomposed else None
        result[name] = Fn.merged_weight(w0, p, q, m, n)
    return result


def line_fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """(least-squares slope of y on x, Pearson correlation); NaN where undefined (fewer than 2 distinct x)."""
    if len(x) < 2:
        return math.nan, math.nan
    xs, ys = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    dx, dy = xs - xs.mean(), ys - ys.mean()
    sxx, syy, sxy = (dx * dx).sum().item(), (dy * dy).sum().item(), (dx * dy).sum().item()
    slope = sxy / sxx if sxx > 0 else math.nan
    corr = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan
    return slope, corr


def write_csv(points: list[Point], path: str | Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "step", "layer", "delta_m", "delta_d"])
    for p in points:
        writer.writerow([p.method, p.step, p.layer, f"{p.delta_m:.9g}", f"{p.delta_d:.9g}"])
    atomic_write_text(path, buf.getvalue())


def summarize(points: list[Point]) -> dict[str, dict[str, float]]:
    """Per method: number of points, slope and correlation of dM on dD (the paper's reading of Figure 2)."""
    out = {}
    for method in dict.fromkeys(p.method for p in points):
        pts = [p for p in points if p.method == method]
        slope, corr = line_fit([p.delta_d for p in pts], [p.delta_m for p in pts])
        out[method] = {"points": len(pts), "slope": slope, "correlation": corr}
    return out


def plot(points: list[Point], path: str | Path, title: str = "") -> None:
    """One panel per method: dD (x) vs dM (y), colour = checkpoint step, with the fitted line, slope and correlation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(points)
    methods = list(summary)
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.8), squeeze=False)
    for ax, method in zip(axes[0], methods):
        pts = [p for p in points if p.method == method]
        x = [p.delta_d for p in pts]
        y = [p.delta_m for p in pts]
        sc = ax.scatter(x, y, c=[p.step for p in pts], cmap="viridis", s=18)
        s = summary[method]
        if math.isfinite(s["slope"]):
            x0, x1 = min(x), max(x)
            ym = sum(y) / len(y)
            xm = sum(x) / len(x)
            ax.plot([x0, x1], [ym + s["slope"] * (x0 - xm), ym + s["slope"] * (x1 - xm)], "r-", lw=1)
        paper = PAPER_CORRELATIONS.get(method)
        paper_txt = f" (paper {paper:+.2f})" if paper is not None else ""
        ax.set_title(f"{method}: slope {s['slope']:.3g}, corr {s['correlation']:+.2f}{paper_txt}", fontsize=9)
        ax.set_xlabel("direction change dD")
        ax.set_ylabel("magnitude change dM")
        ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        fig.colorbar(sc, ax=ax, label="step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
