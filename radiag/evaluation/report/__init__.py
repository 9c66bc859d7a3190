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
- Every text from the run is HTML-escaped (`markup.escape`): rationales are model output.
- Long tables stop at MAX_ROWS rows and say how many they hold; examples stop at
  MAX_EXAMPLES per model and kind, rationales at MAX_TEXT characters.

Modules: `inputs` (what is shown), `figures` (the plots), `markup` (escaped cells and
tables), `sections` (each section's HTML), `page` (the template around them).
"""

from __future__ import annotations

from pathlib import Path

from radiag.evaluation.report.figures import draw_figures, save_png
from radiag.evaluation.report.inputs import ReportInputs
from radiag.evaluation.report.page import render_page
from radiag.evaluation.report.sections import report_sections

__all__ = ["ReportInputs", "write_report"]


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
    plots = {}  # name -> data URI
    for name, fig in draw_figures(inputs).items():
        png = plots_dir / f"{name}.png"
        png.unlink(missing_ok=True)  # a plot of an earlier report that has no data now
        if fig is not None:
            plots[name] = save_png(fig, png)
    page = render_page(inputs, report_sections(inputs, plots))
    path = Path(out_dir) / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
