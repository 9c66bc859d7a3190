"""HTML building blocks of the report: escaped cells, tables, values, notes, figures.

Every text from the run goes through `escape`: rationales are model output. Long tables
stop at MAX_ROWS rows and say how many they hold; texts stop at MAX_TEXT characters.
"""

from __future__ import annotations

import html
import math
import numbers
from typing import Any

import numpy as np
import pandas as pd

MAX_ROWS = 200  # rows of one HTML table
MAX_EXAMPLES = 3  # rationales shown per model and kind (best / worst)
MAX_TEXT = 4000  # characters of one rationale or description
SPLITS = ("train", "val", "test")
GROUPS = ("CN", "MCI", "AD")  # disease progression order, for the cohort
SOURCES = ("automatic", "judge", "human")  # of criteria scores, in table and plot order
DASH = "—"


def escape(value: Any) -> str:
    """`value` as HTML text: every text from the run goes through here."""
    return html.escape(str(value), quote=True)


def is_missing(value: Any) -> bool:
    """None, NaN, pd.NA or NaT; never a container."""
    if isinstance(value, dict | list | tuple | np.ndarray | pd.Series):
        return False
    return bool(pd.isna(value))


def fmt(value: Any, digits: int = 2) -> str:
    """Plain text of one value: ints with thousands separators, floats to `digits`."""
    if is_missing(value):
        return DASH
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        return f"{float(value):,.{digits}f}"
    return str(value)


def with_ci(value: Any, lo: Any, hi: Any) -> str:
    if is_missing(value):
        return DASH
    if is_missing(lo) or is_missing(hi):
        return fmt(value)
    return f"{fmt(value)} [{fmt(lo)}, {fmt(hi)}]"


def p_text(value: Any) -> str:
    return DASH if is_missing(value) else "<0.001" if value < 0.001 else f"{value:.3f}"


def value_of(row: Any, key: str) -> Any:
    return row.get(key, math.nan)


def is_empty(frame: pd.DataFrame | None) -> bool:
    return frame is None or len(frame) == 0 or len(frame.columns) == 0


def ordered(present: Any, preferred: Any) -> list:
    """The values of `present`: those in `preferred` first, in its order, then the rest sorted."""
    values = [v for v in pd.unique(pd.Series(list(present), dtype=object)) if not is_missing(v)]
    return [p for p in preferred if p in values] + sorted(
        (v for v in values if v not in preferred), key=str
    )


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def html_table(header: list[str], rows: list[list[str]], total: int | None = None) -> str:
    """An HTML table of cells that are already HTML; `total` > len(rows) adds a 'cut' note."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    cut = (
        note(f"Showing the first {len(rows):,} of {total:,} rows.")
        if total and total > len(rows)
        else ""
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{cut}'  # fmt: skip


def td(text: str, css: str = "") -> str:
    """One cell of plain `text` (escaped); numbers are right-aligned by `css` 'num'."""
    return f'<td class="{css}">{escape(text)}</td>' if css else f"<td>{escape(text)}</td>"


def frame_table(frame: pd.DataFrame, digits: int = 2) -> str:
    rows = [
        [td(fmt(v, digits), "num" if isinstance(v, numbers.Number) else "") for v in row]
        for row in frame.head(MAX_ROWS).itertuples(index=False)
    ]
    return html_table([escape(c) for c in frame.columns], rows, len(frame))


def value_html(value: Any) -> str:
    """A count, a list or a (nested) dict of them, as HTML."""
    if isinstance(value, dict):
        if not value:
            return '<span class="muted">none</span>'
        items = "".join(
            f"<tr><th>{escape(k)}</th><td>{value_html(v)}</td></tr>" for k, v in value.items()
        )
        return f'<table class="kv">{items}</table>'
    if isinstance(value, list | tuple):
        return (
            escape(", ".join(fmt(v) for v in value)) if value else '<span class="muted">none</span>'
        )
    if isinstance(value, float) and not is_missing(value):
        return escape(f"{value:,.4g}")  # a record's 77.0 reads 77, a rate 0.0123 keeps its digits
    return escape(fmt(value))


def clip(text: Any) -> str:
    text = "" if is_missing(text) else str(text)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f" … [{len(text):,} characters]"


def img(plots: dict[str, str], name: str, alt: str) -> str:
    return (
        f'<figure><img src="{plots[name]}" alt="{escape(alt)}"></figure>' if name in plots else ""
    )


def plot_or(plots: dict[str, str], name: str, missing: str) -> str:
    return img(plots, name, f"{name} plot") if name in plots else note(missing)


def metric_by_model(metrics: pd.DataFrame, column: str) -> dict[str, Any]:
    if is_empty(metrics) or column not in metrics or "model" not in metrics:
        return {}
    return dict(zip(metrics["model"].astype(str), metrics[column], strict=True))
