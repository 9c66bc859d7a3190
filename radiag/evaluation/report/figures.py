"""The report's plots: one matplotlib figure per section, one panel per model.

Plots use matplotlib's object API (`Figure`, drawn by Agg), never pyplot: no global backend
or figure registry is touched, and nothing needs closing. A figure without data is None.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from radiag.evaluation.criteria import CRITERIA
from radiag.evaluation.metrics import CLASSES
from radiag.evaluation.report.inputs import ReportInputs
from radiag.evaluation.report.markup import (
    GROUPS,
    SOURCES,
    fmt,
    is_empty,
    metric_by_model,
    ordered,
)

if TYPE_CHECKING:  # matplotlib loads where a figure is drawn, not with the module
    from matplotlib.figure import Figure


def draw_figures(inputs: ReportInputs) -> dict[str, Figure | None]:
    """Every plot of the report by name (the PNG's stem); None where there is no data."""
    means, order = criteria_means(inputs.criteria), list(metric_by_model(inputs.metrics, "model"))
    return {
        "cohort": _cohort_figure(inputs.cohort_distributions),
        "models": _metrics_figure(inputs.metrics),
        "confusion": _confusion_figure(inputs.confusion),
        "roc": _roc_figure(inputs.roc),
        "calibration": _reliability_figure(inputs.reliability, inputs.metrics),
        "criteria": _criteria_figure(means, order),
        "criteria_radar": _radar_figure(means, order),
    }


GROUP_COLORS = {"CN": "#4c72b0", "MCI": "#dd8452", "AD": "#c44e52"}


def _panels(n: int, cols: int = 3, size: tuple[float, float] = (4.2, 3.6), **kw: Any):
    """A figure of `n` panels in rows of `cols`; returns (figure, the n axes)."""
    from matplotlib.figure import Figure

    cols = max(1, min(n, cols))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained", dpi=100)
    axes = [fig.add_subplot(rows, cols, i + 1, **kw) for i in range(n)]
    return fig, axes


def save_png(fig: Figure, path: Path) -> str:
    """Write the PNG; return it as a data URI."""
    fig.savefig(path, format="png")
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _model_colors(models: list[str]) -> dict[str, Any]:
    palette = [
        "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3",
        "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd",
    ]  # fmt: skip
    return {m: palette[i % len(palette)] for i, m in enumerate(models)}


def _cohort_figure(visits: pd.DataFrame) -> Figure | None:
    variables = [("AGE", "Age (years)"), ("MMSE", "MMSE"), ("hippocampus_icv", "Hippocampus / ICV")]
    if is_empty(visits) or "label" not in visits:
        return None
    visits = visits.dropna(subset=["label"])
    variables = [(c, t) for c, t in variables if c in visits and visits[c].notna().any()]
    if not variables:
        return None
    fig, axes = _panels(len(variables), size=(4.4, 3.2))
    groups = ordered(visits["label"], GROUPS)
    for ax, (column, title) in zip(axes, variables, strict=True):
        values = pd.to_numeric(visits[column], errors="coerce")
        present = values.dropna().to_numpy(float)
        edges = (  # one bin per integer for integer scores (MMSE): no empty gaps between bins
            np.arange(present.min() - 0.5, present.max() + 1)
            if np.all(present == present.round()) and np.ptp(present) <= 60
            else np.histogram_bin_edges(present, bins=24)
        )
        for group in groups:
            data = values[visits["label"] == group].dropna()
            ax.hist(data, bins=edges, histtype="stepfilled", alpha=0.35, density=True,
                    color=GROUP_COLORS.get(group), label=f"{group} (n={len(data):,})")  # fmt: skip
        ax.set_title(title)
        ax.set_yticks([])
    axes[0].legend(frameon=False, fontsize=8)
    fig.suptitle("Labelled visits, all splits, by diagnosis")
    return fig


def _metrics_figure(metrics: pd.DataFrame) -> Figure | None:
    scores = [("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy"),
              ("macro_f1", "Macro F1")]  # fmt: skip
    scores = [(c, t) for c, t in scores if c in metrics and metrics[c].notna().any()]
    if is_empty(metrics) or "model" not in metrics or not scores:
        return None
    models = list(metrics["model"].astype(str))
    fig, axes = _panels(len(scores), size=(4.2, 0.5 * len(models) + 1.4))
    y = np.arange(len(models))[::-1]
    for ax, (column, title) in zip(axes, scores, strict=True):
        value = metrics[column].to_numpy(float)
        lo = metrics.get(f"{column}_lo", pd.Series(value)).to_numpy(float)
        hi = metrics.get(f"{column}_hi", pd.Series(value)).to_numpy(float)
        err = np.nan_to_num(np.vstack([value - lo, hi - value]), nan=0.0)
        ax.errorbar(value, y, xerr=err, fmt="o", color="#4c72b0", capsize=3)
        ax.set_yticks(y, models if ax is axes[0] else [""] * len(models))
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.6, len(models) - 0.4)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(title)
    fig.suptitle("Test-split scores with 95% bootstrap CIs")
    return fig


def _confusion_figure(confusion: dict[str, pd.DataFrame]) -> Figure | None:
    confusion = {m: c for m, c in confusion.items() if not is_empty(c)}
    if not confusion:
        return None
    fig, axes = _panels(len(confusion), size=(4.2, 3.6))
    for ax, (model, counts) in zip(axes, confusion.items(), strict=True):
        values = counts.to_numpy(float)
        rows = values.sum(axis=1, keepdims=True)
        share = np.divide(values, rows, out=np.zeros_like(values), where=rows > 0)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(values):
            color = "white" if share[i, j] > 0.6 else "black"
            ax.text(j, i, f"{int(count):,}\n{share[i, j]:.0%}", ha="center", va="center",
                    fontsize=8, color=color)  # fmt: skip
        ax.set_xticks(range(values.shape[1]), [str(c) for c in counts.columns])
        ax.set_yticks(range(values.shape[0]), [str(c) for c in counts.index])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(model)
    fig.suptitle("Counts, and share of each true class (row)")
    return fig


def _roc_figure(roc: dict[str, dict[str, tuple]]) -> Figure | None:
    roc = {m: curves for m, curves in roc.items() if curves}
    if not roc:
        return None
    fig, axes = _panels(len(roc), size=(3.8, 3.6))
    for ax, (model, curves) in zip(axes, roc.items(), strict=True):
        ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1)
        for cls in ordered(curves, CLASSES):
            fpr, tpr, auc = curves[cls]
            ax.plot(fpr, tpr, color=GROUP_COLORS.get(cls), label=f"{cls} (AUC {fmt(auc)})")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", title=model)
        ax.set_ylabel("true positive rate")
        ax.set_aspect("equal")
        ax.legend(frameon=False, fontsize=8, loc="lower right")
    fig.suptitle("One-vs-rest ROC curves")
    return fig


def _reliability_figure(
    reliability: dict[str, pd.DataFrame], metrics: pd.DataFrame
) -> Figure | None:
    reliability = {m: b for m, b in reliability.items() if not is_empty(b)}
    if not reliability:
        return None
    ece = metric_by_model(metrics, "ece")
    fig, axes = _panels(len(reliability), size=(3.8, 3.6))
    for ax, (model, bins) in zip(axes, reliability.items(), strict=True):
        conf, acc = bins["confidence"].to_numpy(float), bins["accuracy"].to_numpy(float)
        count = bins["count"].to_numpy(float)
        ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1)
        ax.vlines(conf, conf, acc, color="#c44e52", alpha=0.6, lw=2)
        ax.scatter(conf, acc, s=20 + 180 * count / max(count.max(), 1), color="#4c72b0", zorder=3)
        ax.plot(conf, acc, color="#4c72b0", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)")
        ax.set_ylabel("accuracy")
        ax.set_aspect("equal")
        ax.set_title(f"{model}  ECE {fmt(ece.get(model))}")
    fig.suptitle("Reliability diagrams (marker area ∝ patients in the bin)")
    return fig


def criteria_means(criteria: pd.DataFrame) -> pd.DataFrame:
    """source, model, criterion, mean, sem, n of the 1-5 scores (empty if none)."""
    needed = {"model", "criterion", "source", "score"}
    if is_empty(criteria) or not needed <= set(criteria.columns):
        return pd.DataFrame(columns=["source", "model", "criterion", "mean", "sem", "n"])
    scores = criteria.assign(score=pd.to_numeric(criteria["score"], errors="coerce"))
    scores = scores.dropna(subset=["score"])
    grouped = scores.groupby(["source", "model", "criterion"])["score"]
    means = grouped.agg(["mean", "sem", "count"]).rename(columns={"count": "n"}).reset_index()
    return means


def _criteria_figure(means: pd.DataFrame, order: list[str]) -> Figure | None:
    if means.empty:
        return None
    sources = ordered(means["source"], SOURCES)
    models = ordered(means["model"], order)
    colors = _model_colors(models)
    fig, axes = _panels(len(sources), cols=1, size=(9.0, 3.2))
    for ax, source in zip(axes, sources, strict=True):
        part = means[means["source"] == source]
        criteria = ordered(part["criterion"], CRITERIA)
        width = 0.8 / len(models)
        for i, model in enumerate(models):
            rows = part[part["model"] == model].set_index("criterion").reindex(criteria)
            x = np.arange(len(criteria)) + (i - (len(models) - 1) / 2) * width
            ax.bar(x, rows["mean"], width, yerr=rows["sem"].fillna(0), capsize=2,
                   color=colors[model], label=model)  # fmt: skip
        ax.set_xticks(range(len(criteria)), [c.replace("_", " ") for c in criteria])
        ax.set(ylim=(0, 5.4), ylabel="mean score (1-5)", title=f"source: {source}")
        ax.grid(axis="y", alpha=0.3)
    _legend(fig, axes, len(models))
    return fig


def _radar_figure(means: pd.DataFrame, order: list[str]) -> Figure | None:
    """One radar per source that scored at least three criteria."""
    sources = [
        s for s in ordered(means["source"], SOURCES)
        if means.loc[means["source"] == s, "criterion"].nunique() >= 3
    ]  # fmt: skip
    if not sources:
        return None
    models = ordered(means["model"], order)
    colors = _model_colors(models)
    fig, axes = _panels(len(sources), size=(4.2, 4.0), projection="polar")
    for ax, source in zip(axes, sources, strict=True):
        part = means[means["source"] == source]
        criteria = ordered(part["criterion"], CRITERIA)
        angles = np.linspace(0, 2 * np.pi, len(criteria), endpoint=False)
        for model in models:
            values = part[part["model"] == model].set_index("criterion")["mean"]
            values = values.reindex(criteria).to_numpy(float)
            if np.isnan(values).all():
                continue
            ax.plot(np.r_[angles, angles[:1]], np.r_[values, values[:1]], color=colors[model],
                    label=model)  # fmt: skip
            ax.fill(angles, np.nan_to_num(values), color=colors[model], alpha=0.08)
        ax.set_xticks(angles, [c.replace("_", "\n") for c in criteria], fontsize=8)
        ax.set_ylim(0, 5)
        ax.set_rlabel_position(180 / len(criteria))  # between the first two spokes
        ax.set_title(f"source: {source}", pad=14)
    _legend(fig, axes, len(models))
    return fig


def _legend(fig: Figure, axes: list, n: int) -> None:
    """One legend of the models above all panels, where it covers no data."""
    entries = {}  # label -> handle, over every panel: a model may miss from one of them
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    fig.legend(
        entries.values(), entries.keys(), loc="outside upper center", ncols=min(n, 6), frameon=False
    )
