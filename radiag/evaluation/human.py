"""Human ratings of rationales: blinded sheets out, filled sheets in, inter-rater agreement.

Blinding: a rater sees an opaque item id, the patient description, the rationale and
the diagnosis it concludes; never the model that wrote it nor the patient's true label.
Items are shuffled with a seed, so their order tells nothing either. The key from item
id back to (model, patient_id) is written to its own file, which is not for raters.

Raters fill either the CSV sheet (in a spreadsheet) or the self-contained HTML form,
which downloads the same columns as a CSV. Scores are integers 1-5 on the five
criteria of the judge (`radiag.evaluation.judge_prompts.RUBRICS`); a blank is "not rated".
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from radiag.errors import UserError
from radiag.evaluation.agreement import quadratic_kappa
from radiag.evaluation.criteria import CRITERIA
from radiag.evaluation.judge_prompts import RUBRICS, diagnosis_text

UNIT_COLUMNS = ("model", "patient_id", "criterion")  # one rated unit of a long ratings table
LEVELS = ("nominal", "ordinal", "interval", "ratio")
MAX_REPORTED = 20  # problems listed in one RatingError


class RatingError(UserError, ValueError):
    """A filled sheet that cannot be imported; the message names file, row and column."""


def export_rating_sheet(
    items: pd.DataFrame, out_dir: Path, seed: int = 0, per_model: int | None = None
) -> tuple[Path, Path, Path]:
    """Write a blinded rating sheet, its key and an HTML form for the same items.

    Args:
        items: model, patient_id, description, rationale and optionally diagnosis (the
            model's); any other column (a label, say) is never written for raters. Rows
            without a rationale are dropped.
        out_dir: created if missing.
        seed: shuffling and sampling seed. Default: 0.
        per_model: rate at most this many random rationales per model. Default: all.

    Returns:
        (rating_sheet.csv, rating_key.csv, rating_form.html). The sheet has item_id,
        description, rationale, [diagnosis,] one empty column per criterion and comment;
        the key has item_id, model, patient_id and must not reach the raters.
    """
    missing = {"model", "patient_id", "description", "rationale"} - set(items.columns)
    if missing:
        raise ValueError(f"items lack column(s) {sorted(missing)}")
    usable = items[items["rationale"].fillna("").str.strip().astype(bool)]
    shuffled = usable.sample(frac=1.0, random_state=seed)
    if per_model is not None:
        shuffled = shuffled.groupby("model", sort=False).head(per_model)
    width = len(str(len(shuffled)))
    shuffled = shuffled.assign(item_id=[f"item-{i:0{width}d}" for i in range(1, len(shuffled) + 1)])
    sheet = shuffled[["item_id", "description", "rationale"]].copy()
    if "diagnosis" in shuffled:
        sheet["diagnosis"] = shuffled["diagnosis"].map(diagnosis_text)
    for column in (*CRITERIA, "comment"):
        sheet[column] = ""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "rating_sheet.csv", out_dir / "rating_key.csv", out_dir / "rating_form.html"
    sheet.to_csv(paths[0], index=False)
    shuffled[["item_id", "model", "patient_id"]].to_csv(paths[1], index=False)
    paths[2].write_text(rating_form(sheet), encoding="utf-8")
    return paths


def import_ratings(sheets: Sequence[Path], key: Path) -> pd.DataFrame:
    """Read filled sheets (one per rater) into a long table, validating every score.

    The rater is a sheet's `rater` column where filled in, else its file name without
    the extension. Rows are numbered as a spreadsheet shows them (the header is row 1).

    Returns:
        rater, item_id, model, patient_id, criterion, score (int), source="human"; one row
        per score given (blanks are left out).

    Raises:
        RatingError: a missing column, a score that is not an integer 1-5 or blank, an
            item id the key does not know, or an item rated twice by one rater; every
            problem found is listed with its file, row and column.
    """
    known = pd.read_csv(key, dtype=str, keep_default_na=False).set_index("item_id")
    problems: list[str] = []
    frames = []
    for path in map(Path, sheets):
        sheet = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        sheet.columns = sheet.columns.str.strip()
        absent = [c for c in ("item_id", *CRITERIA) if c not in sheet]
        if absent:
            problems.append(f"{path}: missing column(s) {', '.join(absent)}")
            continue
        sheet["row"] = sheet.index + 2
        sheet["item_id"] = sheet["item_id"].str.strip()
        rater = sheet["rater"].str.strip() if "rater" in sheet else pd.Series("", sheet.index)
        sheet["rater"] = rater.where(rater != "", path.stem)
        problems += [
            f"{path}: row {r.row}, column 'item_id': {r.item_id!r} is not an item of {key}"
            for r in sheet[~sheet["item_id"].isin(known.index)].itertuples()
        ]
        long = sheet.melt(
            id_vars=["row", "rater", "item_id"],
            value_vars=list(CRITERIA),
            var_name="criterion",
            value_name="raw",
        )
        raw = long["raw"].str.strip()
        bad = long[(raw != "") & ~raw.str.fullmatch(r"[1-5](\.0*)?")]
        problems += [
            f"{path}: row {r.row}, column {r.criterion!r}: {r.raw!r} is not an integer 1-5 "
            "(leave it blank if not rated)"
            for r in bad.itertuples()
        ]
        frames.append(long[raw != ""].assign(file=str(path), raw=raw))
    ratings = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not ratings.empty:
        twice = ratings[ratings.duplicated(["rater", "item_id", "criterion"], keep=False)]
        for (rater, item_id), group in twice.groupby(["rater", "item_id"], sort=True):
            where = sorted(
                {f"{f} row {r}" for f, r in zip(group["file"], group["row"], strict=True)}
            )
            problems.append(f"rater {rater!r} rated {item_id!r} more than once: {', '.join(where)}")
    if problems:
        more = len(problems) - MAX_REPORTED
        listing = problems[:MAX_REPORTED] + ([f"... and {more} more"] if more > 0 else [])
        raise RatingError("invalid ratings:\n  " + "\n  ".join(listing))
    columns = ["rater", "item_id", "model", "patient_id", "criterion", "score", "source"]
    if ratings.empty:
        return pd.DataFrame(columns=columns)
    ratings = ratings.join(known, on="item_id")
    ratings["score"] = ratings["raw"].astype(float).astype(int)
    ratings["source"] = "human"
    ratings["order"] = ratings["criterion"].map({c: i for i, c in enumerate(CRITERIA)})
    return ratings.sort_values(["rater", "item_id", "order"])[columns].reset_index(drop=True)


def krippendorff_alpha(
    ratings: pd.DataFrame, level: str = "ordinal", units: Sequence[str] | None = None
) -> float:
    """Krippendorff's alpha of a long ratings table (rater, unit columns, score).

    Args:
        ratings: one row per (rater, unit) score; missing ratings are simply absent.
        level: "nominal", "ordinal" (1-5 scores; the default), "interval" or "ratio".
        units: the columns naming a unit. Default: those of model, patient_id and
            criterion present (pass one criterion's rows for a per-criterion alpha).

    Returns:
        Alpha (1 = perfect agreement, 0 = chance, < 0 = systematic disagreement); NaN
        when undefined (no unit rated twice, or a single value used throughout).
    """
    units = list(units or [c for c in UNIT_COLUMNS if c in ratings])
    matrix = ratings.pivot(index=units, columns="rater", values="score")
    return alpha_from_matrix(matrix.to_numpy(dtype=float, na_value=np.nan).T, level)


def alpha_from_matrix(data: np.ndarray, level: str = "ordinal") -> float:
    """Krippendorff's alpha of a (raters, units) reliability matrix, NaN = missing.

    After Krippendorff (2011), "Computing Krippendorff's alpha-reliability":

        alpha = 1 - D_o / D_e = 1 - (n - 1) * sum_ck o_ck d2_ck / sum_ck n_c n_k d2_ck

    over the values c, k used. Only pairable units count (m_u >= 2 values in unit u).
    o_ck = sum_u (number of ordered pairs (c, k) of different raters in u) / (m_u - 1) is the
    coincidence matrix, n_c = sum_k o_ck its margins and n = sum_c n_c. The distance is
        nominal:  d2_ck = [c != k]
        ordinal:  d2_ck = (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2
        interval: d2_ck = (c - k)^2
        ratio:    d2_ck = ((c - k) / (c + k))^2
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    data = np.asarray(data, dtype=float)
    values = np.unique(data[~np.isnan(data)])
    # counts[u, c]: raters who gave value c to unit u; (units, V)
    counts = (data.T[:, :, None] == values[None, None, :]).sum(axis=1).astype(float)
    pairable = counts.sum(axis=1)
    counts, pairable = counts[pairable >= 2], pairable[pairable >= 2]
    if len(values) < 2 or len(counts) == 0:
        return float("nan")
    weighted = counts / (pairable - 1)[:, None]
    coincidence = weighted.T @ counts - np.diag(weighted.sum(axis=0))  # (V, V)
    n_c = coincidence.sum(axis=1)
    n = n_c.sum()
    d2 = _distance(values, n_c, level)
    observed = (coincidence * d2).sum()
    expected = (np.outer(n_c, n_c) * d2).sum() / (n - 1)
    return float(1.0 - observed / expected) if expected > 0 else float("nan")


def _distance(values: np.ndarray, n_c: np.ndarray, level: str) -> np.ndarray:
    """Squared distance d2_ck between every two values, (V, V)."""
    c, k = np.meshgrid(values, values, indexing="ij")
    if level == "nominal":
        return (c != k).astype(float)
    if level == "interval":
        return (c - k) ** 2
    if level == "ratio":
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nan_to_num(((c - k) / (c + k)) ** 2)
    # ordinal: ranks only; the n_g between c and k, counting c and k by half
    i, j = np.meshgrid(np.arange(len(values)), np.arange(len(values)), indexing="ij")
    low, high = np.minimum(i, j), np.maximum(i, j)
    cumulative = np.concatenate([[0.0], np.cumsum(n_c)])
    between = cumulative[high + 1] - cumulative[low]
    return (between - (n_c[low] + n_c[high]) / 2) ** 2


def weighted_kappa(ratings: pd.DataFrame) -> pd.DataFrame:
    """Quadratic-weighted Cohen's kappa for every two raters, per criterion.

    Returns:
        criterion, rater_a, rater_b, n (items both rated), kappa (NaN when undefined).
    """
    rows = []
    for criterion, group in _by_criterion(ratings):
        units = [c for c in UNIT_COLUMNS if c in group and c != "criterion"]
        matrix = group.pivot(index=units, columns="rater", values="score")
        for rater_a, rater_b in combinations(sorted(matrix.columns), 2):
            both = matrix[[rater_a, rater_b]].dropna().astype(int)
            kappa = quadratic_kappa(both[rater_a].to_numpy(), both[rater_b].to_numpy())
            rows.append(
                {"criterion": criterion, "rater_a": rater_a, "rater_b": rater_b,
                 "n": len(both), "kappa": kappa}
            )  # fmt: skip
    return pd.DataFrame(rows, columns=["criterion", "rater_a", "rater_b", "n", "kappa"])


def inter_rater_agreement(ratings: pd.DataFrame) -> pd.DataFrame:
    """Per criterion: n_items (rated by anyone), n_pairable (rated at least twice),
    n_raters, alpha (Krippendorff, ordinal) and mean_kappa (mean pairwise quadratic kappa).
    """
    kappas = weighted_kappa(ratings)
    rows = []
    for criterion, group in _by_criterion(ratings):
        units = [c for c in UNIT_COLUMNS if c in group and c != "criterion"]
        per_unit = group.groupby(units)["rater"].nunique()
        rows.append(
            {
                "criterion": criterion,
                "n_items": len(per_unit),
                "n_pairable": int((per_unit >= 2).sum()),
                "n_raters": group["rater"].nunique(),
                "alpha": krippendorff_alpha(group, "ordinal", units),
                "mean_kappa": kappas.loc[kappas["criterion"] == criterion, "kappa"].mean(),
            }
        )
    return pd.DataFrame(rows)


def _by_criterion(ratings: pd.DataFrame):
    """(criterion, rows) in CRITERIA order; a table without a criterion column is one group."""
    if "criterion" not in ratings:
        return [(None, ratings)]
    present = ratings["criterion"].unique()
    order = [c for c in CRITERIA if c in present] + sorted(set(present) - set(CRITERIA))
    return [(c, ratings[ratings["criterion"] == c]) for c in order]


def rating_form(sheet: pd.DataFrame) -> str:
    """A self-contained HTML form for the items of a rating sheet (no network, no library).

    One card per item with 1-5 radio buttons per criterion and a comment box; answers are
    kept in the browser's localStorage as they are given, and a button downloads them as
    a CSV (rater, item_id, criteria..., comment) that `import_ratings` reads.
    """
    form_id = hashlib.sha256("\n".join(sheet["item_id"]).encode()).hexdigest()[:12]
    guide = "".join(
        f"<li><b>{c}</b>: {html.escape(r.instruction)} "
        f"<i>1 = {html.escape(r.scores[1])} 5 = {html.escape(r.scores[5])}</i></li>"
        for c, r in RUBRICS.items()
    )
    cards = "\n".join(_card(row) for row in sheet.to_dict("records"))
    return (
        _FORM.replace("__GUIDE__", guide)
        .replace("__CARDS__", cards)
        .replace("__CRITERIA__", json.dumps(list(CRITERIA)))
        .replace("__FORM_ID__", form_id)
    )


def _card(row: dict) -> str:
    item = html.escape(row["item_id"])
    shown = [("Patient", row["description"]), ("Rationale", row["rationale"])]
    if "diagnosis" in row:
        shown.append(("Diagnosis given", row["diagnosis"]))
    texts = "".join(
        f'<h3>{title}</h3><div class="text">{html.escape(str(text or ""))}</div>'
        for title, text in shown
    )
    scales = "".join(
        f"<tr><th>{c}</th>"
        + "".join(
            f'<td><label title="{html.escape(RUBRICS[c].scores[s])}">'
            f'<input type="radio" name="{item}/{c}" value="{s}"> {s}</label></td>'
            for s in range(1, 6)
        )
        + "</tr>"
        for c in CRITERIA
    )
    return (
        f'<section class="card" data-item="{item}"><h2>{item}</h2>{texts}'
        f'<table class="scale">{scales}</table>'
        f'<textarea name="{item}/comment" placeholder="comment (optional)"></textarea></section>'
    )


_FORM = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Rating clinical rationales</title>
<style>
body { font-family: sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
.card { border: 1px solid #bbb; border-radius: 6px; padding: 1rem; margin: 1.5rem 0; }
.text { white-space: pre-wrap; background: #f6f6f6; padding: .5rem; }
.scale th { text-align: left; padding-right: 1rem; } .scale td { padding: 0 .6rem; }
textarea { width: 100%; min-height: 3rem; margin-top: .5rem; }
#bar { position: sticky; top: 0; background: #fff; padding: .5rem 0; border-bottom: 1px solid #ddd; }
</style>
</head>
<body>
<h1>Rating clinical rationales</h1>
<p>Each item shows a patient description, a rationale written for it and the diagnosis
the rationale concludes. Rate every rationale from 1 (worst) to 5 (best) on each
criterion; hover over a number for its meaning. Answers are saved in this browser as you
go. When done, enter your rater id and download the CSV.</p>
<ul>__GUIDE__</ul>
<div id="bar"><label>Rater id <input id="rater"></label>
<button id="download" type="button">Download ratings (CSV)</button> <span id="status"></span></div>
__CARDS__
<script>
const CRITERIA = __CRITERIA__;
const STORE = "radiag-rating-form-__FORM_ID__";
const quote = (v) => '"' + String(v).replace(/"/g, '""') + '"';

function answers() {
  const saved = {rater: document.getElementById("rater").value};
  for (const input of document.querySelectorAll("input[type=radio]:checked, textarea")) {
    saved[input.name] = input.value;
  }
  return saved;
}

function restore() {
  const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
  document.getElementById("rater").value = saved.rater || "";
  for (const [name, value] of Object.entries(saved)) {
    for (const input of document.getElementsByName(name)) {
      if (input.type === "radio") input.checked = input.value === value;
      else input.value = value;
    }
  }
}

function toCsv() {
  const rater = document.getElementById("rater").value.trim();
  const lines = [["rater", "item_id", ...CRITERIA, "comment"]];
  let blank = 0;
  for (const card of document.querySelectorAll(".card")) {
    const item = card.dataset.item;
    const line = [rater, item];
    for (const criterion of CRITERIA) {
      const checked = card.querySelector(`input[name="${item}/${criterion}"]:checked`);
      if (!checked) blank += 1;
      line.push(checked ? checked.value : "");
    }
    line.push(card.querySelector("textarea").value);
    lines.push(line);
  }
  return {text: lines.map((l) => l.map(quote).join(",")).join("\\r\\n") + "\\r\\n", rater, blank};
}

for (const type of ["input", "change"]) {
  document.addEventListener(type, () => localStorage.setItem(STORE, JSON.stringify(answers())));
}
document.getElementById("download").addEventListener("click", () => {
  const {text, rater, blank} = toCsv();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], {type: "text/csv"}));
  link.download = "ratings-" + (rater.replace(/[^A-Za-z0-9_-]+/g, "_") || "anonymous") + ".csv";
  link.click();
  URL.revokeObjectURL(link.href);
  document.getElementById("status").textContent =
    blank ? blank + " scores still blank" : "every item rated, thank you";
});
restore();
</script>
</body>
</html>
"""
