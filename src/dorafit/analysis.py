"""The weight-decomposition analysis of the DoRA paper (section 3, Figure 2).

For a layer's weight W_t at training step t against the pretrained W0 (both [out, in]; for LoRA and DoRA the
merged weight), with k output units j:

    dM_t = (1/k) * sum_j | ||W_t[j]|| - ||W0[j]|| |          magnitude change
    dD_t = (1/k) * sum_j (1 - cos(W_t[j], W0[j]))             direction change

Plotting dD (x) against dM (y), one point per layer per checkpoint, the paper finds a negative slope for full
fine-tuning (correlation -0.62) and DoRA (-0.31), and a positive one for LoRA (+0.83).

:func:`analyze_runs` applies this to run folders written by ``dorafit train --save-every N`` (the command
``dorafit analyze``): step 0 is the pretrained weight itself (dM = dD = 0); it is kept in the CSV and left out of
the fit and the plot, where it would only add a cluster of points at the origin.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import functional as Fn
from .files import atomic_write_figure, atomic_write_json, atomic_write_text
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
    """Per method: number of points, slope and correlation of dM on dD over all points (the paper's reading of
    Figure 2), ``within_step_correlation``: the mean over steps of the correlation across layers at one step
    (NaN if no step has 3 or more layers), which leaves out what all layers share by growing over training, and
    ``mean_dM`` / ``mean_dD``: the means over all points (their ratio says how much a method changes magnitudes
    for a given change of direction)."""
    out = {}
    for method in dict.fromkeys(p.method for p in points):
        pts = [p for p in points if p.method == method]
        slope, corr = line_fit([p.delta_d for p in pts], [p.delta_m for p in pts])
        per_step = []
        for step in sorted({p.step for p in pts}):
            at = [p for p in pts if p.step == step]
            if len(at) >= 3:
                per_step.append(line_fit([p.delta_d for p in at], [p.delta_m for p in at])[1])
        per_step = [c for c in per_step if math.isfinite(c)]
        within = sum(per_step) / len(per_step) if per_step else math.nan
        out[method] = {"points": len(pts), "slope": slope, "correlation": corr, "within_step_correlation": within,
                       "mean_dM": sum(p.delta_m for p in pts) / len(pts),
                       "mean_dD": sum(p.delta_d for p in pts) / len(pts)}
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
    atomic_write_figure(path, fig)
    plt.close(fig)


# ---- run folders ---------------------------------------------------------------------------------------------
SNAPSHOT_DIR = re.compile(r"step-(\d+)")


def snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every snapshot of a run, by step; an error saying how to get some if there are none."""
    folder = Path(run_dir) / "snapshots"
    found = sorted((int(m.group(1)), p) for p in (folder.iterdir() if folder.is_dir() else [])
                   if p.is_dir() and (m := SNAPSHOT_DIR.fullmatch(p.name)))
    if not found:
        raise ValueError(f"{run_dir} has no snapshots ({folder}/step-N/ is missing); train the run with "
                         "dorafit train --save-every N to keep the weights at several steps")
    return found


def _select(available: list[str], modules: list[str] | None, run_dir: Path) -> list[str]:
    """The available module names that ``modules`` (names or name suffixes) pick; all of them if None."""
    if not modules:
        return available
    picked = [n for n in available if any(n == m or n.endswith("." + m) for m in modules)]
    for m in modules:
        if not any(n == m or n.endswith("." + m) for n in picked):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in available})
            raise ValueError(f"--modules {m!r} matches none of the modules {run_dir}'s snapshots hold; they hold: "
                             f"{', '.join(leaves)}")
    return picked


def _adapter_weights(model: nn.Module, steps: list[tuple[int, Path]], modules, run_dir):
    """Yields (step, {name: (W0, W_t)}) for an adapter run: W_t is the merged weight at the snapshot."""
    from .io import VERA_PREFIX, load_adapter, read_adapter, set_adapter_state_dict

    load_adapter(model, steps[0][1])  # applies the saved config once
    layers = dict(adapted_modules(model))
    names = _select(list(layers), modules, run_dir)
    w0 = {n: layers[n].dorafit.ops.weight_matrix(layers[n]).detach().clone() for n in names}
    first = read_adapter(steps[0][1])[0]["config"]
    for step, folder in steps:
        meta, tensors = read_adapter(folder)
        if meta["config"] != first:
            raise ValueError(f"{folder} holds an adapter with another config than {steps[0][1]}; a run's snapshots "
                             "must come from one run")
        set_adapter_state_dict(model, {k: v for k, v in tensors.items() if not k.startswith(VERA_PREFIX)})
        merged = effective_weights(model)
        yield step, {n: (w0[n], merged[n]) for n in names}


def _full_weights(model: nn.Module, steps: list[tuple[int, Path]], modules, run_dir):
    """Yields (step, {name: (W0, W_t)}) for a full fine-tuning run from its snapshots' weights.safetensors."""
    from safetensors.torch import load_file

    from .layers import ops_for

    all_modules = dict(model.named_modules())
    held = [k[: -len(".weight")] for k in load_file(steps[0][1] / "weights.safetensors") if k.endswith(".weight")]
    unknown = [n for n in held if n not in all_modules or ops_for(all_modules[n]) is None]
    if unknown:
        raise ValueError(f"{steps[0][1]} holds weights of {unknown[0]!r}, which the run's base model has not (or "
                         "which is no layer with a weight matrix)")
    names = _select(held, modules, run_dir)
    ops = {n: ops_for(all_modules[n]) for n in names}
    w0 = {n: ops[n].weight_matrix(all_modules[n]).detach().clone() for n in names}
    for step, folder in steps:
        tensors = load_file(folder / "weights.safetensors")
        result = {}
        for n in names:
            if f"{n}.weight" not in tensors:
                raise ValueError(f"{folder}/weights.safetensors lacks {n}.weight; the snapshot is incomplete")
            with torch.no_grad():
                all_modules[n].weight.copy_(tensors[f"{n}.weight"])
            result[n] = (w0[n], ops[n].weight_matrix(all_modules[n]).detach().clone())
        yield step, result


def run_points(run_dir: Path, modules: list[str] | None = None, label: str | None = None,
               device: str = "cpu") -> list[Point]:
    """One :class:`Point` per snapshot step and selected layer of a run; ``label`` (default: the method) names it.

    The run's base model is loaded once (on ``device``: auto, cpu or cuda); adapter snapshots are set into it in turn.
    """
    from .train.models import resolve_model
    from .train.setup import pick_device, stored_config
    from .train.tasks import by_kind

    run_dir = Path(run_dir)
    cfg, resolved = stored_config(run_dir)
    if cfg.quantize:
        raise ValueError(f"{run_dir} was trained on a base quantized {cfg.quantize}; dorafit analyze reads float "
                         "weights and does not analyse a quantized base yet: analyse a run trained without --quantize")
    steps = snapshots(run_dir)
    model = by_kind(resolved["kind"]).load_model(resolve_model(cfg.model), resolved).model
    model.requires_grad_(False).to(pick_device(device))
    weights = _full_weights if cfg.method == "full" else _adapter_weights
    label = label or cfg.method
    points = []
    for step, pairs in weights(model, steps, modules, run_dir):
        for name, (w0, w) in pairs.items():
            dm, dd = decomposition_change(w0, w)
            points.append(Point(label, step, name, dm, dd))
    return points


def analyze_runs(runs: list[Path], out: Path, modules: list[str] | None = None, labels: list[str] | None = None,
                 title: str = "", device: str = "cpu") -> dict:
    """The analysis of ``runs`` into ``out``: decomposition.csv (every point), decomposition.png and summary.json
    (fit and plot without step 0). Returns the summary."""
    points = []
    for i, run in enumerate(runs):
        points.extend(run_points(run, modules, labels[i] if labels else None, device))
    trained = [p for p in points if p.step > 0]
    if not trained:
        raise ValueError("the runs have snapshots at step 0 only; train them with --save-every N for N below the "
                         "number of steps")
    out = Path(out)
    write_csv(points, out / "decomposition.csv")
    plot(trained, out / "decomposition.png", title)
    methods = summarize(trained)
    for label, s in methods.items():
        s.update({k: None for k in ("slope", "correlation", "within_step_correlation") if not math.isfinite(s[k])})
        s["paper_correlation"] = PAPER_CORRELATIONS.get(label)
        s["steps"] = sorted({p.step for p in trained if p.method == label})
        s["layers"] = sorted({p.layer for p in trained if p.method == label})
    summary = {"runs": [str(r) for r in runs], "modules": modules, "methods": methods,
               "note": "fit over every layer and snapshot step > 0; dM, dD per METHOD.md"}
    atomic_write_json(out / "summary.json", summary)
    return summary
