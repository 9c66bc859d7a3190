"""The run report: one self-contained HTML page, and its plots as PNG files.

`write_report(inputs, out_dir)` writes

- `out_dir/plots/*.png`: cohort distributions, model metrics with CIs, confusion matrices,
  ROC curves, reliability diagrams, rationale criteria (bars and a radar); one figure per
  section, one panel per model.
- `out_dir/report.html`: one file that opens offline. The plots are inlined as base64 data
  URIs, the CSS is inline, the page has no script, and its Content-Security-Policy forbids
  scripts and every fetch.

Rules every section follows:

- A missing part renders as a sentence saying so (a run with only the teacher: "no model
  exposes class probabilities", "not scored"); nothing in `ReportInputs` is required.
- Every text from the run goes through `html.escape`: rationales are model output.
- Long tables stop at MAX_ROWS rows and say how many they hold; examples stop at
  MAX_EXAMPLES per model and kind, rationales at MAX_TEXT characters.

Plots use matplotlib's object API (`Figure`, drawn by Agg), never pyplot: no global backend
or figure registry is touched, and nothing needs closing.
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from radiag.evaluation.criteria import CRITERIA
from radiag.evaluation.metrics import CLASSES

MAX_ROWS = 200  # rows of one HTML table
MAX_EXAMPLES = 3  # rationales shown per model and kind (best / worst)
MAX_TEXT = 4000  # characters of one rationale or description
SPLITS = ("train", "val", "test")
GROUPS = ("CN", "MCI", "AD")  # disease progression order, for the cohort
GROUP_COLORS = {"CN": "#4c72b0", "MCI": "#dd8452", "AD": "#c44e52"}
SOURCES = ("automatic", "judge", "human")
DASH = "—"


@dataclass
class ReportInputs:
    """Everything the report shows; `radiag.evaluation.stage.run_evaluate` builds it."""

    manifest: dict
    """The run's manifest.json: config, versions, seeds, git_commit, stages, python, ..."""
    cohort_summary: pd.DataFrame
    """One row per (split, group): n, age_mean, age_sd, female_pct, mmse_mean, mmse_sd,
    apoe4_carrier_pct."""
    cohort_distributions: pd.DataFrame
    """One row per visit: split, label, AGE, MMSE, hippocampus_icv."""
    metrics: pd.DataFrame
    """One row per model: `metrics.MODEL_METRICS_COLUMNS` (NaN where not computable)."""
    confusion: dict[str, pd.DataFrame]
    """model -> counts; index = true class, columns = predicted class + 'unparsed'."""
    roc: dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]]
    """model -> class -> (fpr, tpr, auc); models without probabilities are absent."""
    reliability: dict[str, pd.DataFrame]
    """model -> bins: confidence, accuracy, count."""
    paired: pd.DataFrame
    """McNemar per model pair: model_a, model_b, n, both_right, a_only, b_only, both_wrong,
    p_value."""
    criteria: pd.DataFrame
    """Long: model, criterion, source (automatic/judge/human), score (1-5), patient_id."""
    examples: list[dict]
    """Best and worst rationales: model, patient_id, kind, description, record, rationale,
    diagnosis, label, scores (criterion -> score)."""
    counts: dict[str, Any]
    """Named counts (int, or a dict of them): quarantine reasons, QC flags, unparsed, ..."""
    problems: list[str]
    """Inputs that could not be evaluated; shown in a banner at the top."""
    agreement: pd.DataFrame | None = None
    """Agreement between score sources: criterion, pair, n, spearman, kappa, ..."""


def write_report(inputs: ReportInputs, out_dir: Path) -> Path:
    """Write `out_dir/plots/*.png` and `out_dir/report.html`; see the module docstring.

    Args:
        inputs (ReportInputs): what to show; any part may be empty.
        out_dir (Path): created if missing; a report already there is replaced, plots too.

    Returns:
        Path: `out_dir/report.html`.

    Example:
        >>> write_report(inputs, Path("reports"))  # doctest: +SKIP
        PosixPath('reports/report.html')
    """
    plots_dir = Path(out_dir) / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    means, order = _criteria_means(inputs.criteria), list(_metric_by_model(inputs.metrics, "model"))
    figures = {
        "cohort": _cohort_figure(inputs.cohort_distributions),
        "models": _metrics_figure(inputs.metrics),
        "confusion": _confusion_figure(inputs.confusion),
        "roc": _roc_figure(inputs.roc),
        "calibration": _reliability_figure(inputs.reliability, inputs.metrics),
        "criteria": _criteria_figure(means, order),
        "criteria_radar": _radar_figure(means, order),
    }
    plots = {}  # name -> data URI
    for name, fig in figures.items():
        png = plots_dir / f"{name}.png"
        png.unlink(missing_ok=True)  # a plot of an earlier report that has no data now
        if fig is not None:
            plots[name] = _save(fig, png)
    sections = [
        ("manifest", "Run", _manifest_section(inputs.manifest, inputs.metrics)),
        ("cohort", "Cohort", _cohort_section(inputs.cohort_summary, plots)),
        ("models", "Model comparison", _models_section(inputs.metrics, plots)),
        (
            "confusion",
            "Confusion matrices",
            _plot_or(plots, "confusion", "No model was evaluated."),
        ),
        ("roc", "ROC curves", _roc_section(inputs, plots)),
        ("calibration", "Calibration", _calibration_section(inputs, plots)),
        ("paired", "Paired comparisons (McNemar)", _paired_section(inputs.paired)),
        ("criteria", "Rationale criteria", _criteria_section(inputs, plots)),
        ("examples", "Best and worst rationales", _examples_section(inputs.examples)),
        ("counts", "Counts", _counts_section(inputs.counts)),
    ]
    page = _page(inputs, sections)
    path = Path(out_dir) / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------- formatting


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _missing(value: Any) -> bool:
    """None, NaN, pd.NA or NaT; never a container."""
    if isinstance(value, dict | list | tuple | np.ndarray | pd.Series):
        return False
    return bool(pd.isna(value))


def _fmt(value: Any, digits: int = 2) -> str:
    """Plain text of one value: ints with thousands separators, floats to `digits`."""
    if _missing(value):
        return DASH
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        return f"{float(value):,.{digits}f}"
    return str(value)


def _ci(value: Any, lo: Any, hi: Any) -> str:
    if _missing(value):
        return DASH
    if _missing(lo) or _missing(hi):
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(lo)}, {_fmt(hi)}]"


def _p(value: Any) -> str:
    return DASH if _missing(value) else "<0.001" if value < 0.001 else f"{value:.3f}"


def _get(row: Any, key: str) -> Any:
    return row.get(key, math.nan)


def _empty(frame: pd.DataFrame | None) -> bool:
    return frame is None or len(frame) == 0 or len(frame.columns) == 0


def _ordered(present: Any, preferred: Any) -> list:
    """The values of `present`: those in `preferred` first, in its order, then the rest sorted."""
    values = [v for v in pd.unique(pd.Series(list(present), dtype=object)) if not _missing(v)]
    return [p for p in preferred if p in values] + sorted(
        (v for v in values if v not in preferred), key=str
    )


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _table(header: list[str], rows: list[list[str]], total: int | None = None) -> str:
    """An HTML table of cells that are already HTML; `total` > len(rows) adds a 'cut' note."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    cut = (
        _note(f"Showing the first {len(rows):,} of {total:,} rows.")
        if total and total > len(rows)
        else ""
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{cut}'  # fmt: skip


def _td(text: str, css: str = "") -> str:
    """One cell of plain `text` (escaped); numbers are right-aligned by `css` 'num'."""
    return f'<td class="{css}">{_e(text)}</td>' if css else f"<td>{_e(text)}</td>"


def _frame_table(frame: pd.DataFrame, digits: int = 2) -> str:
    rows = [
        [_td(_fmt(v, digits), "num" if isinstance(v, numbers.Number) else "") for v in row]
        for row in frame.head(MAX_ROWS).itertuples(index=False)
    ]
    return _table([_e(c) for c in frame.columns], rows, len(frame))


def _value_html(value: Any) -> str:
    """A count, a list or a (nested) dict of them, as HTML."""
    if isinstance(value, dict):
        if not value:
            return '<span class="muted">none</span>'
        items = "".join(
            f"<tr><th>{_e(k)}</th><td>{_value_html(v)}</td></tr>" for k, v in value.items()
        )
        return f'<table class="kv">{items}</table>'
    if isinstance(value, list | tuple):
        return _e(", ".join(_fmt(v) for v in value)) if value else '<span class="muted">none</span>'
    if isinstance(value, float) and not _missing(value):
        return _e(f"{value:,.4g}")  # a record's 77.0 reads 77, a rate 0.0123 keeps its digits
    return _e(_fmt(value))


def _clip(text: Any) -> str:
    text = "" if _missing(text) else str(text)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f" … [{len(text):,} characters]"


# ---------------------------------------------------------------- plots


def _panels(n: int, cols: int = 3, size: tuple[float, float] = (4.2, 3.6), **kw: Any):
    """A figure of `n` panels in rows of `cols`; returns (figure, the n axes)."""
    cols = max(1, min(n, cols))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained", dpi=100)
    axes = [fig.add_subplot(rows, cols, i + 1, **kw) for i in range(n)]
    return fig, axes


def _save(fig: Figure, path: Path) -> str:
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
    if _empty(visits) or "label" not in visits:
        return None
    visits = visits.dropna(subset=["label"])
    variables = [(c, t) for c, t in variables if c in visits and visits[c].notna().any()]
    if not variables:
        return None
    fig, axes = _panels(len(variables), size=(4.4, 3.2))
    groups = _ordered(visits["label"], GROUPS)
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
    if _empty(metrics) or "model" not in metrics or not scores:
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
    confusion = {m: c for m, c in confusion.items() if not _empty(c)}
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
        for cls in _ordered(curves, CLASSES):
            fpr, tpr, auc = curves[cls]
            ax.plot(fpr, tpr, color=GROUP_COLORS.get(cls), label=f"{cls} (AUC {_fmt(auc)})")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", title=model)
        ax.set_ylabel("true positive rate")
        ax.set_aspect("equal")
        ax.legend(frameon=False, fontsize=8, loc="lower right")
    fig.suptitle("One-vs-rest ROC curves")
    return fig


def _reliability_figure(
    reliability: dict[str, pd.DataFrame], metrics: pd.DataFrame
) -> Figure | None:
    reliability = {m: b for m, b in reliability.items() if not _empty(b)}
    if not reliability:
        return None
    ece = _metric_by_model(metrics, "ece")
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
        ax.set_title(f"{model}  ECE {_fmt(ece.get(model))}")
    fig.suptitle("Reliability diagrams (marker area ∝ patients in the bin)")
    return fig


def _criteria_means(criteria: pd.DataFrame) -> pd.DataFrame:
    """source, model, criterion, mean, sem, n of the 1-5 scores (empty if none)."""
    needed = {"model", "criterion", "source", "score"}
    if _empty(criteria) or not needed <= set(criteria.columns):
        return pd.DataFrame(columns=["source", "model", "criterion", "mean", "sem", "n"])
    scores = criteria.assign(score=pd.to_numeric(criteria["score"], errors="coerce"))
    scores = scores.dropna(subset=["score"])
    grouped = scores.groupby(["source", "model", "criterion"])["score"]
    means = grouped.agg(["mean", "sem", "count"]).rename(columns={"count": "n"}).reset_index()
    return means


def _criteria_figure(means: pd.DataFrame, order: list[str]) -> Figure | None:
    if means.empty:
        return None
    sources = _ordered(means["source"], SOURCES)
    models = _ordered(means["model"], order)
    colors = _model_colors(models)
    fig, axes = _panels(len(sources), cols=1, size=(9.0, 3.2))
    for ax, source in zip(axes, sources, strict=True):
        part = means[means["source"] == source]
        criteria = _ordered(part["criterion"], CRITERIA)
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
        s for s in _ordered(means["source"], SOURCES)
        if means.loc[means["source"] == s, "criterion"].nunique() >= 3
    ]  # fmt: skip
    if not sources:
        return None
    models = _ordered(means["model"], order)
    colors = _model_colors(models)
    fig, axes = _panels(len(sources), size=(4.2, 4.0), projection="polar")
    for ax, source in zip(axes, sources, strict=True):
        part = means[means["source"] == source]
        criteria = _ordered(part["criterion"], CRITERIA)
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


def _metric_by_model(metrics: pd.DataFrame, column: str) -> dict[str, Any]:
    if _empty(metrics) or column not in metrics or "model" not in metrics:
        return {}
    return dict(zip(metrics["model"].astype(str), metrics[column], strict=True))


# ---------------------------------------------------------------- sections


def _img(plots: dict[str, str], name: str, alt: str) -> str:
    return f'<figure><img src="{plots[name]}" alt="{_e(alt)}"></figure>' if name in plots else ""


def _plot_or(plots: dict[str, str], name: str, missing: str) -> str:
    return _img(plots, name, f"{name} plot") if name in plots else _note(missing)


def _manifest_section(manifest: dict, metrics: pd.DataFrame) -> str:
    if not manifest:
        return _note("No manifest.json in this run.")
    facts = {
        "git commit": manifest.get("git_commit"), "updated at": manifest.get("updated_at"),
        "python": manifest.get("python"), "platform": manifest.get("platform"),
        "run dir": (manifest.get("config") or {}).get("run_dir"),
    }  # fmt: skip
    parts = [_value_html({k: v for k, v in facts.items() if v is not None})]
    engines = _engines(manifest.get("config") or {})
    parts.append("<h3>Engines and models</h3>")
    parts.append(
        _table(["used by", "backend", "model"], [[_td(w), _td(b), _td(m)] for w, b, m in engines])
        if engines else _note("The config names no engine.")
    )  # fmt: skip
    if not _empty(metrics) and "model" in metrics:
        evaluated = ", ".join(metrics["model"].astype(str))
        parts.append(f"<p>Models evaluated: <b>{_e(evaluated)}</b></p>")
    parts.append("<h3>Seeds</h3>" + _value_html(manifest.get("seeds") or {}))
    stages = manifest.get("stages") or {}
    if stages:
        rows = [
            [_td(name), f"<td>{_value_html((s or {}).get('counts') or {})}</td>"]
            for name, s in stages.items()
        ]
        parts.append("<h3>Stages</h3>" + _table(["stage", "counts"], rows))
    versions = manifest.get("versions") or {}
    items = "".join(f"<li><code>{_e(k)}</code> {_e(v)}</li>" for k, v in sorted(versions.items()))
    parts.append(
        f'<h3>Package versions</h3><ul class="versions">{items}</ul>'
        if versions else "<h3>Package versions</h3>" + _note("not recorded")
    )  # fmt: skip
    config = json.dumps(manifest.get("config") or {}, indent=2, default=str)
    parts.append(f"<details><summary>Full config</summary><pre>{_e(config)}</pre></details>")
    return "".join(parts)


def _engines(config: Any, path: str = "") -> list[tuple[str, str, str]]:
    """(config path, backend, model) of every config block that names a `model`."""
    found = []
    if isinstance(config, dict):
        if "model" in config:
            model = config["model"]
            if isinstance(model, dict):
                model = ", ".join(f"{k}: {v}" for k, v in model.items() if v is not None)
            found.append((path or "(top)", str(config.get("backend", DASH)), str(model)))
        for key, value in config.items():
            if key != "model":
                found += _engines(value, f"{path}.{key}" if path else str(key))
    return found


def _cohort_section(summary: pd.DataFrame, plots: dict[str, str]) -> str:
    if _empty(summary):
        table = _note("No cohort summary.")
    else:
        order = {s: i for i, s in enumerate(SPLITS)} | {g: i for i, g in enumerate(GROUPS)}
        summary = summary.sort_values(
            ["split", "group"], key=lambda s: s.map(lambda v: (order.get(v, 99), str(v)))
        ) if {"split", "group"} <= set(summary.columns) else summary  # fmt: skip
        rows = []
        for _, r in summary.head(MAX_ROWS).iterrows():
            rows.append([
                _td(_fmt(_get(r, "split"))), _td(_fmt(_get(r, "group"))),
                _td(_fmt(_get(r, "n")), "num"),
                _td(f"{_fmt(_get(r, 'age_mean'), 1)} ± {_fmt(_get(r, 'age_sd'), 1)}", "num"),
                _td(f"{_fmt(_get(r, 'female_pct'), 1)}%", "num"),
                _td(f"{_fmt(_get(r, 'mmse_mean'), 1)} ± {_fmt(_get(r, 'mmse_sd'), 1)}", "num"),
                _td(f"{_fmt(_get(r, 'apoe4_carrier_pct'), 1)}%", "num"),
            ])  # fmt: skip
        header = ["split", "group", "visits", "age", "female", "MMSE", "APOE4 carriers"]
        table = _table(header, rows, len(summary))
    return table + _img(plots, "cohort", "cohort distributions by diagnosis")


_HIGHER = ("coverage", "accuracy", "balanced_accuracy", "macro_f1", "auc_ovr", "mauc")


def _best(metrics: pd.DataFrame) -> dict[str, float]:
    """Per metric column, the best value, where at least two models differ on it."""
    best = {}
    for column in (*_HIGHER, "ece"):
        values = pd.to_numeric(metrics.get(column, pd.Series(dtype=float)), errors="coerce")
        values = values.dropna()
        if values.nunique() > 1:
            best[column] = values.min() if column == "ece" else values.max()
    return best


def _models_section(metrics: pd.DataFrame, plots: dict[str, str]) -> str:
    if _empty(metrics) or "model" not in metrics:
        return _note("No model was evaluated.")
    best = _best(metrics)

    def cell(row: Any, column: str, text: str) -> str:
        hit = column in best and _get(row, column) == best[column]
        return _td(text, "num best" if hit else "num")

    rows = []
    for _, r in metrics.head(MAX_ROWS).iterrows():
        coverage = _get(r, "coverage")
        rows.append([
            _td(_fmt(r["model"])), _td(_fmt(_get(r, "n")), "num"),
            cell(r, "coverage", DASH if _missing(coverage) else f"{coverage:.0%}"),
            *[cell(r, c, _ci(_get(r, c), _get(r, f"{c}_lo"), _get(r, f"{c}_hi")))
              for c in ("accuracy", "balanced_accuracy", "macro_f1")],
            cell(r, "auc_ovr", _fmt(_get(r, "auc_ovr"))), cell(r, "mauc", _fmt(_get(r, "mauc"))),
            cell(r, "ece", _fmt(_get(r, "ece"))),
            _td(_fmt(_get(r, "unparsed")), "num"), _td(_fmt(_get(r, "errors")), "num"),
        ])  # fmt: skip
    header = ["model", "n", "coverage", "accuracy", "balanced accuracy", "macro F1",
              "AUC (OvR)", "mAUC", "ECE ↓", "unparsed", "errors"]  # fmt: skip
    return (
        _note("Scores on the labelled test patients each model covers, with 95% bootstrap "
              "CIs. Unparsed answers and failed rows count as wrong and are listed apart. "
              "Best value per column highlighted; — = not computable (no probabilities).")
        + _table(header, rows, len(metrics))
        + _img(plots, "models", "scores with confidence intervals")
    )  # fmt: skip


def _roc_section(inputs: ReportInputs, plots: dict[str, str]) -> str:
    if "roc" not in plots:
        return _note("No model exposes class probabilities: no ROC curve.")
    without = [m for m in _metric_by_model(inputs.metrics, "model") if not inputs.roc.get(m)]
    note = _note(f"No class probabilities: {', '.join(without)}.") if without else ""
    return _img(plots, "roc", "ROC curves") + note


def _calibration_section(inputs: ReportInputs, plots: dict[str, str]) -> str:
    if "calibration" not in plots:
        return _note("No model exposes class probabilities: no reliability diagram.")
    ece = _metric_by_model(inputs.metrics, "ece")
    rows = [[_td(m), _td(_fmt(v, 3) if not _missing(v) else "no probabilities", "num")]
            for m, v in ece.items()]  # fmt: skip
    return (
        _note("Top-label expected calibration error over 10 equal-width confidence bins.")
        + _img(plots, "calibration", "reliability diagrams")
        + (_table(["model", "ECE"], rows) if rows else "")
    )


def _paired_section(paired: pd.DataFrame) -> str:
    if _empty(paired):
        return _note("Fewer than two models: no paired comparison.")
    rows = []
    for _, r in paired.head(MAX_ROWS).iterrows():
        p = _get(r, "p_value")
        css = "num best" if not _missing(p) and p < 0.05 else "num"
        rows.append(
            [_td(_fmt(_get(r, "model_a"))), _td(_fmt(_get(r, "model_b")))]
            + [_td(_fmt(_get(r, c)), "num") for c in ("n", "both_right", "a_only", "b_only", "both_wrong")]
            + [_td(_p(p), css)]
        )  # fmt: skip
    header = ["model A", "model B", "n", "both right", "A only right", "B only right",
              "both wrong", "p (exact McNemar)"]  # fmt: skip
    return (
        _note("On the patients both models cover; p < 0.05 highlighted (not corrected for "
              "multiple comparisons).")
        + _table(header, rows, len(paired))
    )  # fmt: skip


def _criteria_section(inputs: ReportInputs, plots: dict[str, str]) -> str:
    means = _criteria_means(inputs.criteria)
    if means.empty:
        body = _note("Rationales were not scored.")
    else:
        criteria = _ordered(means["criterion"], CRITERIA)
        keys = means[["model", "source"]].drop_duplicates()
        models = _ordered(keys["model"], list(_metric_by_model(inputs.metrics, "model")))
        sources = _ordered(keys["source"], SOURCES)
        keys = keys.assign(
            m=keys["model"].map(models.index), s=keys["source"].map(sources.index)
        ).sort_values(["m", "s"])
        indexed = means.set_index(["model", "source", "criterion"])
        rows = []
        for model, source in keys[["model", "source"]].itertuples(index=False):
            cells = []
            for criterion in criteria:
                key = (model, source, criterion)
                text = (
                    f"{indexed.loc[key, 'mean']:.2f} (n={int(indexed.loc[key, 'n']):,})"
                    if key in indexed.index else DASH
                )  # fmt: skip
                cells.append(_td(text, "num"))
            rows.append([_td(model), _td(source), *cells])
        header = ["model", "source", *[_e(c.replace("_", " ")) for c in criteria]]
        body = (
            _note(
                "Mean score on a 1-5 scale (higher is better) and rationales scored; "
                "error bars: ±1 standard error."
            )
            + _table(header, rows[:MAX_ROWS], len(rows))
            + _img(plots, "criteria", "criteria scores per model")
            + _img(plots, "criteria_radar", "criteria radar per model")
        )
    if not _empty(inputs.agreement):
        body += "<h3>Agreement between sources</h3>" + _frame_table(inputs.agreement)
    return body


def _examples_section(examples: list[dict]) -> str:
    if not examples:
        return _note("No rationale was scored: no examples.")
    by_model: dict[str, dict[str, list[dict]]] = {}
    for example in examples:
        kinds = by_model.setdefault(str(example.get("model", DASH)), {})
        kinds.setdefault(str(example.get("kind", "best")), []).append(example)
    parts = []
    for model, kinds in by_model.items():
        columns = "".join(
            f'<div><h4>{_e(kind.capitalize())}</h4>'
            + "".join(_example_card(x) for x in kinds.get(kind, [])[:MAX_EXAMPLES])
            + "</div>"
            for kind in _ordered(kinds, ["best", "worst"])
        )  # fmt: skip
        parts.append(f'<h3>{_e(model)}</h3><div class="pair">{columns}</div>')
    return "".join(parts)


def _example_card(example: dict) -> str:
    label, diagnosis = example.get("label"), example.get("diagnosis")
    verdict = (
        "unparsed" if _missing(diagnosis) else "right" if diagnosis == label else "wrong"
    )  # fmt: skip
    scores = "".join(
        f'<span class="chip">{_e(str(c).replace("_", " "))} {_e(_fmt(s, 1))}</span>'
        for c, s in (example.get("scores") or {}).items()
    )
    record = example.get("record") or {}
    return (
        '<article class="card">'
        f"<header><b>patient {_e(_fmt(example.get('patient_id')))}</b> · true "
        f'<b>{_e(_fmt(label))}</b> · predicted <span class="badge {verdict}">'
        f"{_e(verdict if verdict == 'unparsed' else diagnosis)}</span></header>"
        f'<div class="chips">{scores}</div>'
        f'<div class="example"><div>{_value_html(record) if record else ""}</div>'
        f'<blockquote class="rationale">{_e(_clip(example.get("rationale")))}</blockquote></div>'
        f"<details><summary>Patient description given to the model</summary>"
        f'<p class="description">{_e(_clip(example.get("description")))}</p></details>'
        "</article>"
    )


def _counts_section(counts: dict[str, Any]) -> str:
    if not counts:
        return _note("No counts recorded.")
    return _value_html(counts)


# ---------------------------------------------------------------- page


def _page(inputs: ReportInputs, sections: list[tuple[str, str, str]]) -> str:
    manifest = inputs.manifest or {}
    run_dir = (manifest.get("config") or {}).get("run_dir") or ""
    commit = str(manifest.get("git_commit") or "")[:10]
    subtitle = " · ".join(
        _e(s) for s in (run_dir, manifest.get("updated_at"), commit and f"commit {commit}") if s
    )
    banner = ""
    if inputs.problems:
        items = "".join(f"<li>{_e(p)}</li>" for p in inputs.problems)
        banner = (
            f'<section id="problems" class="problems"><h2>{len(inputs.problems)} input(s) '
            f"could not be evaluated</h2><ul>{items}</ul></section>"
        )
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>'
        for sid, title, content in sections
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>radiag report{" — " + _e(run_dir) if run_dir else ""}</title>
<style>{_CSS}</style></head>
<body><header class="top"><h1>radiag run report</h1><p class="muted">{subtitle}</p>
{_headline(inputs)}</header>{banner}<nav>{nav}</nav><main>{body}</main>
<footer class="muted">Written by radiag.evaluation.report. Self-contained: no script, no
external resource.</footer></body></html>
"""


def _headline(inputs: ReportInputs) -> str:
    metrics = inputs.metrics
    tiles = [("models evaluated", _fmt(0 if _empty(metrics) else len(metrics)))]
    if not _empty(metrics) and {"n", "model", "balanced_accuracy"} <= set(metrics.columns):
        tiles.append(("test patients scored (max)", _fmt(pd.to_numeric(metrics["n"]).max())))
        scored = metrics.dropna(subset=["balanced_accuracy"])
        if len(scored):
            top = scored.loc[scored["balanced_accuracy"].astype(float).idxmax()]
            tiles.append((f"best balanced accuracy: {top['model']}", _fmt(top["balanced_accuracy"])))  # fmt: skip
    tiles.append(("problems", _fmt(len(inputs.problems))))
    cells = "".join(f'<div class="tile"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in tiles)
    return f'<div class="tiles">{cells}</div>'


_CSS = """
:root { --fg:#1f2933; --muted:#62707d; --line:#d9dee3; --bg:#f4f6f8; --accent:#2f5d8a; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg); line-height:1.45;
  font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
header.top, nav, main, footer, section.problems { max-width:1200px; margin:0 auto; padding:0 20px; }
header.top { padding-top:24px; } h1 { margin:0 0 4px; font-size:26px; }
h2 { margin:0 0 12px; font-size:20px; color:var(--accent); } h3 { margin:18px 0 8px; font-size:16px; }
h4 { margin:4px 0 8px; font-size:14px; text-transform:uppercase; letter-spacing:.05em; color:var(--muted); }
nav { display:flex; flex-wrap:wrap; gap:6px 14px; padding:10px 20px; position:sticky; top:0;
  background:var(--bg); border-bottom:1px solid var(--line); z-index:1; }
nav a { color:var(--accent); text-decoration:none; font-size:14px; } nav a:hover { text-decoration:underline; }
main > section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:18px 22px; margin:18px 0; }
section.problems { background:#fdecea; border:2px solid #c0392b; border-radius:8px; margin:16px auto;
  padding:12px 22px; } section.problems h2 { color:#a93226; }
.tiles { display:flex; flex-wrap:wrap; gap:12px; margin:14px 0; }
.tile { background:#fff; border:1px solid var(--line); border-radius:8px; padding:10px 16px; min-width:150px; }
.tile b { display:block; font-size:22px; } .tile span { color:var(--muted); font-size:13px; }
.muted, .note { color:var(--muted); } .note { font-size:13px; margin:4px 0 10px; }
.scroll { overflow-x:auto; }
table { border-collapse:collapse; font-size:13.5px; margin:6px 0 12px; }
th, td { border-bottom:1px solid var(--line); padding:5px 10px; text-align:left; vertical-align:top; }
thead th { background:#eef2f6; font-weight:600; white-space:nowrap; }
tbody tr:nth-child(even) { background:#fafbfc; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.best { background:#e3f4e8; font-weight:700; }
table.kv th { font-weight:500; color:var(--muted); background:none; white-space:normal; }
table.kv table.kv { margin:0; }
figure { margin:12px 0; } img { max-width:100%; height:auto; display:block; }
details { margin:10px 0; } summary { cursor:pointer; color:var(--accent); }
pre { background:#f7f8fa; border:1px solid var(--line); border-radius:6px; padding:10px;
  overflow:auto; max-height:480px; font-size:12.5px; }
ul.versions { columns:3 220px; font-size:13px; padding-left:18px; }
.pair { display:grid; grid-template-columns:1fr 1fr; gap:16px; }
@media (max-width:800px) { .pair { grid-template-columns:1fr; } }
.card { border:1px solid var(--line); border-radius:8px; padding:10px 12px; margin-bottom:12px; font-size:13.5px; }
.card > header { margin-bottom:6px; }
.example { display:grid; grid-template-columns:minmax(150px, 36%) 1fr; gap:10px; }
.example table.kv { font-size:12px; margin:0; } .example table.kv th, .example table.kv td { padding:2px 6px; }
blockquote.rationale { margin:0; padding:8px 10px; background:#f7f8fa; border-left:3px solid var(--accent);
  white-space:pre-wrap; overflow-wrap:anywhere; }
p.description { white-space:pre-wrap; font-size:13px; }
.chips { display:flex; flex-wrap:wrap; gap:4px; margin-bottom:8px; }
.chip { background:#eef2f6; border-radius:10px; padding:1px 8px; font-size:12px; }
.badge { border-radius:4px; padding:0 6px; font-weight:700; }
.badge.right { background:#e3f4e8; color:#1e7b3c; } .badge.wrong { background:#fdecea; color:#a93226; }
.badge.unparsed { background:#eee; color:#555; }
footer { padding:10px 20px 30px; font-size:12px; }
"""
