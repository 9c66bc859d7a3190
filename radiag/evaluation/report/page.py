"""The page around the sections: header with headline tiles, problem banner, navigation.

The template's Content-Security-Policy forbids scripts and every fetch: images are data
URIs and the CSS is inline, so the file opens offline.
"""

from __future__ import annotations

from string import Template

import pandas as pd

from radiag.evaluation.report.inputs import ReportInputs
from radiag.evaluation.report.markup import escape, fmt, is_empty

_TEMPLATE = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>radiag report$title</title>
<style>$css</style></head>
<body><header class="top"><h1>radiag run report</h1><p class="muted">$subtitle</p>
$headline</header>$banner<nav>$nav</nav><main>$body</main>
<footer class="muted">Written by radiag.evaluation.report. Self-contained: no script, no
external resource.</footer></body></html>
""")


def render_page(inputs: ReportInputs, sections: list[tuple[str, str, str]]) -> str:
    """The whole HTML page; `sections` are (id, title, HTML) in page order."""
    manifest = inputs.manifest or {}
    run_dir = (manifest.get("config") or {}).get("run_dir") or ""
    commit = str(manifest.get("git_commit") or "")[:10]
    subtitle = " · ".join(
        escape(s) for s in (run_dir, manifest.get("updated_at"), commit and f"commit {commit}") if s
    )
    return _TEMPLATE.substitute(
        title=" — " + escape(run_dir) if run_dir else "",
        css=CSS,
        subtitle=subtitle,
        headline=_headline(inputs),
        banner=_banner(inputs.problems),
        nav="".join(f'<a href="#{sid}">{escape(title)}</a>' for sid, title, _ in sections),
        body="".join(
            f'<section id="{sid}"><h2>{escape(title)}</h2>{content}</section>'
            for sid, title, content in sections
        ),
    )


def _banner(problems: list[str]) -> str:
    if not problems:
        return ""
    items = "".join(f"<li>{escape(p)}</li>" for p in problems)
    return (
        f'<section id="problems" class="problems"><h2>{len(problems)} input(s) '
        f"could not be evaluated</h2><ul>{items}</ul></section>"
    )


def _headline(inputs: ReportInputs) -> str:
    metrics = inputs.metrics
    tiles = [("models evaluated", fmt(0 if is_empty(metrics) else len(metrics)))]
    if not is_empty(metrics) and {"n", "model", "balanced_accuracy"} <= set(metrics.columns):
        tiles.append(("test patients scored (max)", fmt(pd.to_numeric(metrics["n"]).max())))
        scored = metrics.dropna(subset=["balanced_accuracy"])
        if len(scored):
            top = scored.loc[scored["balanced_accuracy"].astype(float).idxmax()]
            tiles.append((f"best balanced accuracy: {top['model']}", fmt(top["balanced_accuracy"])))  # fmt: skip
    tiles.append(("problems", fmt(len(inputs.problems))))
    cells = "".join(
        f'<div class="tile"><b>{escape(v)}</b><span>{escape(k)}</span></div>' for k, v in tiles
    )
    return f'<div class="tiles">{cells}</div>'


CSS = """
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
