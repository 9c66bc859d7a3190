"""What an experiment writes next to its runs: the table in four formats, the comparisons,
a forest plot, `experiment.json` (provenance) and `report.html`, which opens with the table
and the plot.
"""

from __future__ import annotations

import base64
import datetime
import io
import math
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa

from radiag.evaluation.report.markup import (
    DASH,
    escape,
    fmt,
    html_table,
    is_missing,
    p_text,
    td,
    with_ci,
)
from radiag.evaluation.report.page import CSS
from radiag.experiments.config import ExperimentsConfig
from radiag.experiments.runner import ARM_RECORD
from radiag.pipeline import git_commit, machine
from radiag.store import RunStore

if TYPE_CHECKING:  # matplotlib loads where a figure is drawn, not with the module
    from matplotlib.figure import Figure

CHANCE = 1 / 3  # balanced accuracy of a guess among three classes
DISPLAY = {
    "name": "arm", "kind": "kind", "n": "n", "balanced_accuracy": "balanced accuracy [95% CI]",
    "macro_f1": "macro-F1 [95% CI]", "mauc": "mAUC", "coverage": "coverage",
    "consistency": "consistency", "specificity": "specificity", "epochs": "epochs",
    "wall_seconds": "wall s", "tokens": "tokens",
    "external_balanced_accuracy": "external: n, balanced accuracy [95% CI]", "smoke": "smoke test",
}  # fmt: skip


def write_experiment(
    cfg: ExperimentsConfig, table: pd.DataFrame, comparisons: pd.DataFrame, problems: list[str]
) -> str:
    """Write every output into `<output_dir>/<name>/`; returns the report's location."""
    out = RunStore(cfg.root)
    out.write_table("table.parquet", _arrow(table))
    out.write_bytes("table.csv", table.to_csv(index=False).encode())
    shown = display_table(table)
    out.write_bytes("table.md", markdown(shown).encode())
    out.write_bytes("table.tex", shown.to_latex(index=False, escape=True).encode())
    out.write_table("comparisons.parquet", _arrow(comparisons))
    out.write_bytes("comparisons.csv", comparisons.to_csv(index=False).encode())
    figure = forest_plot(table, comparisons, cfg.reference)
    png = _png(figure) if figure is not None else None
    if png is not None:
        out.write_bytes("forest.png", png)
    out.write_json("experiment.json", provenance(cfg, table))
    out.write_bytes("report.html", page(cfg, shown, comparisons, problems, png).encode())
    return out.uri_of("report.html")


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as people read it: each score with its CI, rounded."""
    rows = []
    for row in table.to_dict("records"):
        rows.append(
            {
                **{key: fmt(row[key]) for key in ("name", "kind", "n")},
                "balanced_accuracy": with_ci(
                    *(row[f"balanced_accuracy{s}"] for s in ("", "_lo", "_hi"))
                ),
                "macro_f1": with_ci(*(row[f"macro_f1{s}"] for s in ("", "_lo", "_hi"))),
                **{
                    key: fmt(row[key])
                    for key in ("mauc", "coverage", "consistency", "specificity", "epochs")
                },
                "wall_seconds": fmt(row["wall_seconds"], 0),
                "tokens": fmt(row["tokens"], 0),
                "external_balanced_accuracy": _external(row),
                "smoke": row["smoke"] or "",
            }
        )
    return pd.DataFrame(rows, columns=list(DISPLAY)).rename(columns=DISPLAY)


def _external(row: dict[str, Any]) -> str:
    """n and balanced accuracy on the external cohort; a dash where the arm has none."""
    if is_missing(row["external_n"]):
        return DASH
    scores = (row[f"external_balanced_accuracy{s}"] for s in ("", "_lo", "_hi"))
    return f"{fmt(row['external_n'])}: {with_ci(*scores)}"


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += [
        "| " + " | ".join(str(v).replace("|", "/") for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join(lines) + "\n"


def forest_plot(table: pd.DataFrame, comparisons: pd.DataFrame, reference: str) -> Figure | None:
    """Left: each arm's balanced accuracy with its CI against chance. Right: its paired
    difference from the reference arm with that CI, against no difference."""
    from matplotlib.figure import Figure

    if table.empty:
        return None
    names = list(table["name"])[::-1]
    fig = Figure(figsize=(11, 0.45 * len(names) + 1.6), layout="constrained", dpi=100)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    rows = table.set_index("name").loc[names]
    _intervals(
        left, rows["balanced_accuracy"], rows["balanced_accuracy_lo"], rows["balanced_accuracy_hi"]
    )
    left.axvline(CHANCE, color="#c44e52", linestyle=":", label="chance (1/3)")
    left.set_xlabel("balanced accuracy (95% subject-bootstrap CI)")
    left.legend(loc="lower right", fontsize=8)
    diffs = comparisons.set_index("name").reindex(names)
    _intervals(right, diffs["difference"], diffs["difference_lo"], diffs["difference_hi"])
    right.axvline(0, color="#555555", linestyle=":")
    right.set_xlabel(f"difference from {reference} (paired bootstrap CI)")
    right.set_yticklabels([])
    for axis in (left, right):
        axis.set_yticks(range(len(names)))
        axis.grid(axis="x", alpha=0.3)
    left.set_yticklabels(names)
    return fig


def _intervals(axis: Any, value: pd.Series, lo: pd.Series, hi: pd.Series) -> None:
    y = range(len(value))
    axis.errorbar(
        value, y, xerr=[(value - lo).clip(lower=0), (hi - value).clip(lower=0)],
        fmt="o", color="#4c72b0", ecolor="#4c72b0", capsize=3,
    )  # fmt: skip


def provenance(cfg: ExperimentsConfig, table: pd.DataFrame) -> dict[str, Any]:
    """What made the table: config, commit, machine, each arm's stage identities and time."""
    arms = {}
    for arm in cfg.arms:
        store = RunStore(cfg.arm_run(arm).run_dir)
        if store.exists(ARM_RECORD):
            record = store.read_json(ARM_RECORD)
            arms[arm.name] = {k: record[k] for k in ("kind", "identities", "wall_seconds")}
    return {
        "name": cfg.name,
        "config": cfg.model_dump(mode="json"),
        "commit": git_commit(),
        "machine": machine(),
        "written_at": datetime.datetime.now(datetime.UTC).isoformat(),
        "wall_seconds": round(sum(a["wall_seconds"] for a in arms.values()), 1),
        "arms": arms,
        "table": [_plain(row) for row in table.to_dict("records")],
    }


def page(
    cfg: ExperimentsConfig,
    shown: pd.DataFrame,
    comparisons: pd.DataFrame,
    problems: list[str],
    png: bytes | None,
) -> str:
    """report.html: the table (as `display_table` shows it) and the plot first, then the
    comparisons, then provenance."""
    rows = [[td(str(v)) for v in row] for row in shown.itertuples(index=False)]
    plot = (
        f'<img alt="forest plot" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        if png
        else "<p>No arm has finished.</p>"
    )
    compared = [
        [td(r["name"]), td(r["reference"]), td(fmt(r["n"]), "num"),
         td(with_ci(r["difference"], r["difference_lo"], r["difference_hi"]), "num"),
         td(f"{fmt(r['a_only'])} / {fmt(r['b_only'])}", "num"), td(p_text(r["p_value"]), "num")]
        for r in comparisons.to_dict("records")
    ]  # fmt: skip
    banner = "".join(f"<li>{escape(p)}</li>" for p in problems)
    smoke = int((shown[DISPLAY["smoke"]] != "").sum())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>radiag experiment — {escape(cfg.name)}</title><style>{CSS}</style></head>
<body><header class="top"><h1>Experiment {escape(cfg.name)}</h1>
<p class="muted">{len(shown)} models on one test split; every CI resamples subjects
({cfg.bootstrap} resamples). Reference arm: {escape(cfg.reference)}.</p></header>
{f'<section class="problems"><h2>Not in the table</h2><ul>{banner}</ul></section>' if banner else ""}
<main><section id="table"><h2>Models</h2>
{html_table([escape(c) for c in shown.columns], rows)}
{f'<p class="note">{smoke} row(s) are smoke tests (see the last column): not results.</p>' if smoke else ""}
{plot}</section>
<section id="comparisons"><h2>Each arm minus {escape(cfg.reference)} (balanced accuracy)</h2>
{html_table(["arm", "reference", "paired n", "difference [95% CI]", "right only in arm / in reference", "McNemar p"], compared)}
</section>
<section id="provenance"><h2>Provenance</h2><p>Config, commit, machine and each arm's stage
identities: <code>experiment.json</code> beside this page.</p></section></main></body></html>
"""


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _arrow(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame, preserve_index=False)


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
