"""The report's sections, in page order: each a title and its HTML, from `ReportInputs`.

A missing part renders as a sentence saying so (a run with only the teacher: "no model
exposes class probabilities", "not scored"). Examples stop at MAX_EXAMPLES per model and
kind.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from radiag.evaluation.criteria import CRITERIA
from radiag.evaluation.report.figures import criteria_means
from radiag.evaluation.report.inputs import ReportInputs
from radiag.evaluation.report.markup import (
    DASH,
    GROUPS,
    MAX_EXAMPLES,
    MAX_ROWS,
    SOURCES,
    SPLITS,
    clip,
    escape,
    fmt,
    frame_table,
    html_table,
    img,
    is_empty,
    is_missing,
    metric_by_model,
    note,
    ordered,
    p_text,
    plot_or,
    td,
    value_html,
    value_of,
    with_ci,
)


def report_sections(inputs: ReportInputs, plots: dict[str, str]) -> list[tuple[str, str, str]]:
    """(id, title, HTML) of every section; `plots` maps a plot name to its data URI."""
    return [
        ("models", "Model comparison", _models_section(inputs.metrics, plots)),
        ("manifest", "Run", _manifest_section(inputs.manifest, inputs.metrics)),
        ("cohort", "Cohort", _cohort_section(inputs.cohort_summary, plots)),
        ("confusion", "Confusion matrices", plot_or(plots, "confusion", "No model was evaluated.")),
        ("roc", "ROC curves", _roc_section(inputs, plots)),
        ("calibration", "Calibration", _calibration_section(inputs, plots)),
        ("paired", "Paired comparisons (McNemar)", _paired_section(inputs.paired)),
        ("criteria", "Rationale criteria", _criteria_section(inputs, plots)),
        ("examples", "Best and worst rationales", _examples_section(inputs.examples)),
        ("counts", "Counts", _counts_section(inputs.counts)),
    ]


def _manifest_section(manifest: dict, metrics: pd.DataFrame) -> str:
    if not manifest:
        return note("No manifest.json in this run.")
    facts = {
        "git commit": manifest.get("git_commit"), "updated at": manifest.get("updated_at"),
        "python": manifest.get("python"), "platform": manifest.get("platform"),
        "run dir": (manifest.get("config") or {}).get("run_dir"),
    }  # fmt: skip
    parts = [value_html({k: v for k, v in facts.items() if v is not None})]
    engines = _engines(manifest.get("config") or {})
    parts.append("<h3>Engines and models</h3>")
    parts.append(
        html_table(["used by", "backend", "model"], [[td(w), td(b), td(m)] for w, b, m in engines])
        if engines else note("The config names no engine.")
    )  # fmt: skip
    if not is_empty(metrics) and "model" in metrics:
        evaluated = ", ".join(metrics["model"].astype(str))
        parts.append(f"<p>Models evaluated: <b>{escape(evaluated)}</b></p>")
    parts.append("<h3>Seeds</h3>" + value_html(manifest.get("seeds") or {}))
    stages = manifest.get("stages") or {}
    if stages:
        rows = [
            [td(name), f"<td>{value_html((s or {}).get('counts') or {})}</td>"]
            for name, s in stages.items()
        ]
        parts.append("<h3>Stages</h3>" + html_table(["stage", "counts"], rows))
    versions = manifest.get("versions") or {}
    items = "".join(
        f"<li><code>{escape(k)}</code> {escape(v)}</li>" for k, v in sorted(versions.items())
    )
    parts.append(
        f'<h3>Package versions</h3><ul class="versions">{items}</ul>'
        if versions else "<h3>Package versions</h3>" + note("not recorded")
    )  # fmt: skip
    config = json.dumps(manifest.get("config") or {}, indent=2, default=str)
    parts.append(f"<details><summary>Full config</summary><pre>{escape(config)}</pre></details>")
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
    if is_empty(summary):
        table = note("No cohort summary.")
    else:
        order = {s: i for i, s in enumerate(SPLITS)} | {g: i for i, g in enumerate(GROUPS)}
        summary = summary.sort_values(
            ["split", "group"], key=lambda s: s.map(lambda v: (order.get(v, 99), str(v)))
        ) if {"split", "group"} <= set(summary.columns) else summary  # fmt: skip
        rows = []
        for _, r in summary.head(MAX_ROWS).iterrows():
            rows.append([
                td(fmt(value_of(r, "split"))), td(fmt(value_of(r, "group"))),
                td(fmt(value_of(r, "n")), "num"),
                td(f"{fmt(value_of(r, 'age_mean'), 1)} ± {fmt(value_of(r, 'age_sd'), 1)}", "num"),
                td(f"{fmt(value_of(r, 'female_pct'), 1)}%", "num"),
                td(f"{fmt(value_of(r, 'mmse_mean'), 1)} ± {fmt(value_of(r, 'mmse_sd'), 1)}", "num"),
                td(f"{fmt(value_of(r, 'apoe4_carrier_pct'), 1)}%", "num"),
            ])  # fmt: skip
        header = ["split", "group", "visits", "age", "female", "MMSE", "APOE4 carriers"]
        table = html_table(header, rows, len(summary))
    return table + img(plots, "cohort", "cohort distributions by diagnosis")


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
    if is_empty(metrics) or "model" not in metrics:
        return note("No model was evaluated.")
    best = _best(metrics)

    def cell(row: Any, column: str, text: str) -> str:
        hit = column in best and value_of(row, column) == best[column]
        return td(text, "num best" if hit else "num")

    rows = []
    for _, r in metrics.head(MAX_ROWS).iterrows():
        coverage = value_of(r, "coverage")
        rows.append([
            td(fmt(r["model"])), td(fmt(value_of(r, "n")), "num"),
            cell(r, "coverage", DASH if is_missing(coverage) else f"{coverage:.0%}"),
            *[cell(r, c, with_ci(value_of(r, c), value_of(r, f"{c}_lo"), value_of(r, f"{c}_hi")))
              for c in ("accuracy", "balanced_accuracy", "macro_f1")],
            cell(r, "auc_ovr", fmt(value_of(r, "auc_ovr"))), cell(r, "mauc", fmt(value_of(r, "mauc"))),
            cell(r, "ece", fmt(value_of(r, "ece"))),
            td(fmt(value_of(r, "unparsed")), "num"), td(fmt(value_of(r, "errors")), "num"),
            td(_smoke_text(value_of(r, "smoke")), "smoke"),
        ])  # fmt: skip
    header = ["model", "n", "coverage", "accuracy", "balanced accuracy", "macro F1",
              "AUC (OvR)", "mAUC", "ECE ↓", "unparsed", "errors", "smoke test"]  # fmt: skip
    smoke = int(metrics.get("smoke", pd.Series(dtype=str)).fillna("").astype(bool).sum())
    return (
        note("Scores on the labelled test patients each model covers, with 95% bootstrap "
              "CIs. Unparsed answers and failed rows count as wrong and are listed apart. "
              "Best value per column highlighted; — = not computable (no probabilities).")
        + (note(f"{smoke} model(s) are smoke tests (last column): too few test patients or "
                "less than one epoch of training. For results, run `radiag experiments`.")
           if smoke else "")
        + html_table(header, rows, len(metrics))
        + img(plots, "models", "scores with confidence intervals")
    )  # fmt: skip


def _smoke_text(reason: Any) -> str:
    return "" if is_missing(reason) or not reason else f"smoke test: {reason}"


def _roc_section(inputs: ReportInputs, plots: dict[str, str]) -> str:
    if "roc" not in plots:
        return note("No model exposes class probabilities: no ROC curve.")
    without = [m for m in metric_by_model(inputs.metrics, "model") if not inputs.roc.get(m)]
    unscored = note(f"No class probabilities: {', '.join(without)}.") if without else ""
    return img(plots, "roc", "ROC curves") + unscored


def _calibration_section(inputs: ReportInputs, plots: dict[str, str]) -> str:
    if "calibration" not in plots:
        return note("No model exposes class probabilities: no reliability diagram.")
    ece = metric_by_model(inputs.metrics, "ece")
    rows = [[td(m), td(fmt(v, 3) if not is_missing(v) else "no probabilities", "num")]
            for m, v in ece.items()]  # fmt: skip
    return (
        note("Top-label expected calibration error over 10 equal-width confidence bins.")
        + img(plots, "calibration", "reliability diagrams")
        + (html_table(["model", "ECE"], rows) if rows else "")
    )


def _paired_section(paired: pd.DataFrame) -> str:
    if is_empty(paired):
        return note("Fewer than two models: no paired comparison.")
    rows = []
    for _, r in paired.head(MAX_ROWS).iterrows():
        p = value_of(r, "p_value")
        css = "num best" if not is_missing(p) and p < 0.05 else "num"
        rows.append(
            [td(fmt(value_of(r, "model_a"))), td(fmt(value_of(r, "model_b")))]
            + [td(fmt(value_of(r, c)), "num") for c in ("n", "both_right", "a_only", "b_only", "both_wrong")]
            + [td(p_text(p), css)]
        )  # fmt: skip
    header = ["model A", "model B", "n", "both right", "A only right", "B only right",
              "both wrong", "p (exact McNemar)"]  # fmt: skip
    return (
        note("On the patients both models cover; p < 0.05 highlighted (not corrected for "
              "multiple comparisons).")
        + html_table(header, rows, len(paired))
    )  # fmt: skip


def _criteria_section(inputs: ReportInputs, plots: dict[str, str]) -> str:
    means = criteria_means(inputs.criteria)
    if means.empty:
        body = note("Rationales were not scored.")
    else:
        criteria = ordered(means["criterion"], CRITERIA)
        keys = means[["model", "source"]].drop_duplicates()
        models = ordered(keys["model"], list(metric_by_model(inputs.metrics, "model")))
        sources = ordered(keys["source"], SOURCES)
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
                cells.append(td(text, "num"))
            rows.append([td(model), td(source), *cells])
        header = ["model", "source", *[escape(c.replace("_", " ")) for c in criteria]]
        body = (
            note(
                "Mean score on a 1-5 scale (higher is better) and rationales scored; "
                "error bars: ±1 standard error."
            )
            + html_table(header, rows[:MAX_ROWS], len(rows))
            + img(plots, "criteria", "criteria scores per model")
            + img(plots, "criteria_radar", "criteria radar per model")
        )
    if not is_empty(inputs.agreement):
        body += "<h3>Agreement between sources</h3>" + frame_table(inputs.agreement)
    return body


def _examples_section(examples: list[dict]) -> str:
    if not examples:
        return note("No rationale was scored: no examples.")
    by_model: dict[str, dict[str, list[dict]]] = {}
    for example in examples:
        kinds = by_model.setdefault(str(example.get("model", DASH)), {})
        kinds.setdefault(str(example.get("kind", "best")), []).append(example)
    parts = []
    for model, kinds in by_model.items():
        columns = "".join(
            f'<div><h4>{escape(kind.capitalize())}</h4>'
            + "".join(_example_card(x) for x in kinds.get(kind, [])[:MAX_EXAMPLES])
            + "</div>"
            for kind in ordered(kinds, ["best", "worst"])
        )  # fmt: skip
        parts.append(f'<h3>{escape(model)}</h3><div class="pair">{columns}</div>')
    return "".join(parts)


def _example_card(example: dict) -> str:
    label, diagnosis = example.get("label"), example.get("diagnosis")
    verdict = (
        "unparsed" if is_missing(diagnosis) else "right" if diagnosis == label else "wrong"
    )  # fmt: skip
    scores = "".join(
        f'<span class="chip">{escape(str(c).replace("_", " "))} {escape(fmt(s, 1))}</span>'
        for c, s in (example.get("scores") or {}).items()
    )
    record = example.get("record") or {}
    return (
        '<article class="card">'
        f"<header><b>patient {escape(fmt(example.get('patient_id')))}</b> · true "
        f'<b>{escape(fmt(label))}</b> · predicted <span class="badge {verdict}">'
        f"{escape(verdict if verdict == 'unparsed' else diagnosis)}</span></header>"
        f'<div class="chips">{scores}</div>'
        f'<div class="example"><div>{value_html(record) if record else ""}</div>'
        f'<blockquote class="rationale">{escape(clip(example.get("rationale")))}</blockquote></div>'
        f"<details><summary>Patient description given to the model</summary>"
        f'<p class="description">{escape(clip(example.get("description")))}</p></details>'
        "</article>"
    )


def _counts_section(counts: dict[str, Any]) -> str:
    if not counts:
        return note("No counts recorded.")
    return value_html(counts)
