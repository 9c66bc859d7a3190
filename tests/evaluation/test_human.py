"""Human ratings: blinded export, validated import, and inter-rater agreement statistics."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

from radiag.errors import UserError
from radiag.evaluation.criteria import CRITERIA
from radiag.evaluation.human import (
    RatingError,
    alpha_from_matrix,
    export_rating_sheet,
    import_ratings,
    inter_rater_agreement,
    krippendorff_alpha,
    weighted_kappa,
)

MODELS = ("teacher-secret-model", "student-secret-model")


@pytest.fixture
def items() -> pd.DataFrame:
    """Two models' rationales for 6 patients; a `label` column that must never be shown."""
    rows = [
        {
            "model": model,
            "patient_id": f"adni-{i}-bl",
            "description": f'This patient is a {70 + i}-year-old, MMSE {24 + i}/30, "quoted",\nnext line.',
            "rationale": f"Rationale {j}-{i}, with a comma.",
            "diagnosis": ["AD", "MCI", "CN"][i % 3],
            "label": "TRUE-LABEL-SECRET",
        }
        for j, model in enumerate(MODELS)
        for i in range(6)
    ]
    return pd.DataFrame(rows)


def fill(sheet: Path, out: Path, score_of) -> None:
    """What a rater does: open the sheet, write scores and a comment, save a copy."""
    table = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    for i, item_id in enumerate(table["item_id"]):
        for j, criterion in enumerate(CRITERIA):
            table.loc[i, criterion] = score_of(item_id, i, j)
        table.loc[i, "comment"] = "clear, but long"
    table.to_csv(out, index=False)


def test_export_is_blinded_shuffled_and_keyed(items: pd.DataFrame, tmp_path: Path) -> None:
    sheet, key, form = export_rating_sheet(items, tmp_path, seed=3)
    table = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    assert list(table.columns) == [
        "item_id", "description", "rationale", "diagnosis", *CRITERIA, "comment",
    ]  # fmt: skip
    assert (table[list(CRITERIA)] == "").all().all() and len(table) == 12
    for text in (sheet.read_text(), form.read_text()):
        assert "secret-model" not in text and "TRUE-LABEL-SECRET" not in text
        assert "adni-" not in text  # the patient id would link to the record and its label
    assert set(table["diagnosis"]) == {
        "(A) Alzheimer's Disease", "(B) Mild Cognitive Impairment", "(C) Normal Cognition",
    }  # fmt: skip
    mapping = pd.read_csv(key, dtype=str)
    assert list(mapping.columns) == ["item_id", "model", "patient_id"]
    assert sorted(mapping["item_id"]) == sorted(table["item_id"])
    # Shuffled: the two models' items are interleaved, not in input order.
    assert mapping["model"].tolist() != sorted(mapping["model"].tolist())
    assert mapping["model"].tolist() != items["model"].tolist()
    again, _, _ = export_rating_sheet(items, tmp_path / "again", seed=3)
    assert again.read_text() == sheet.read_text()  # the seed fixes the order


def test_per_model_sampling(items: pd.DataFrame, tmp_path: Path) -> None:
    _, key, _ = export_rating_sheet(items, tmp_path, per_model=2)
    assert pd.read_csv(key)["model"].value_counts().to_dict() == dict.fromkeys(MODELS, 2)


def test_form_has_a_card_and_a_scale_per_item_and_valid_script(
    items: pd.DataFrame, tmp_path: Path
) -> None:
    sheet, _, form = export_rating_sheet(items, tmp_path)
    page = form.read_text()
    ids = pd.read_csv(sheet)["item_id"]
    assert page.count('class="card"') == len(ids)
    assert len(re.findall(r'type="radio"', page)) == len(ids) * len(CRITERIA) * 5
    assert all(f'data-item="{i}"' in page for i in ids)
    assert "&quot;quoted&quot;" in page  # text is escaped, not markup
    assert "http" not in page  # self-contained: nothing fetched
    node = shutil.which("node")
    if node:
        script = page.split("<script>")[1].split("</script>")[0]
        (tmp_path / "form.js").write_text(script)
        subprocess.run([node, "--check", str(tmp_path / "form.js")], check=True)


def test_round_trip_export_fill_import(items: pd.DataFrame, tmp_path: Path) -> None:
    sheet, key, _ = export_rating_sheet(items, tmp_path)
    fill(sheet, tmp_path / "alice.csv", lambda _, i, j: str(1 + (i + j) % 5))
    # Bob leaves the last item's human_likeness blank and names himself in a column.
    fill(sheet, tmp_path / "copy.csv", lambda _, i, j: "" if (i, j) == (11, 4) else "3")
    bob = pd.read_csv(tmp_path / "copy.csv", dtype=str, keep_default_na=False)
    bob.insert(0, "rater", "bob")
    bob.to_csv(tmp_path / "copy.csv", index=False)

    ratings = import_ratings([tmp_path / "alice.csv", tmp_path / "copy.csv"], key)
    assert list(ratings.columns) == [
        "rater", "item_id", "model", "patient_id", "criterion", "score", "source",
    ]  # fmt: skip
    assert ratings["rater"].value_counts().to_dict() == {"alice": 60, "bob": 59}
    assert ratings["score"].dtype.kind == "i" and ratings["score"].between(1, 5).all()
    # Scores land on the right (model, patient_id) through the key.
    mapping = pd.read_csv(key).set_index("item_id")
    first = pd.read_csv(sheet)["item_id"][0]
    alice = ratings[(ratings["rater"] == "alice") & (ratings["item_id"] == first)]
    assert alice["criterion"].tolist() == list(CRITERIA)
    assert alice["score"].tolist() == [1, 2, 3, 4, 5]
    assert (alice["model"] == mapping.loc[first, "model"]).all()
    assert (alice["patient_id"] == mapping.loc[first, "patient_id"]).all()


@pytest.mark.parametrize(
    ("bad", "message"),
    [("6", "'6' is not an integer 1-5"), ("3.5", "'3.5'"), ("good", "'good'"), ("0", "'0'")],
)
def test_a_bad_score_names_file_row_and_column(
    items: pd.DataFrame, tmp_path: Path, bad: str, message: str
) -> None:
    sheet, key, _ = export_rating_sheet(items, tmp_path)
    filled = tmp_path / "carol.csv"
    fill(sheet, filled, lambda _, i, j: bad if (i, j) == (2, 1) else "4")
    with pytest.raises(RatingError) as error:
        import_ratings([filled], key)
    text = str(error.value)
    assert isinstance(error.value, UserError)  # the CLI prints it as one line, exit code 2
    assert f"{filled}: row 4, column 'correctness': {message}" in text  # row 1 is the header
    assert text.count("\n") == 1  # exactly one problem listed


def test_other_sheet_problems_are_reported(items: pd.DataFrame, tmp_path: Path) -> None:
    sheet, key, _ = export_rating_sheet(items, tmp_path)
    fill(sheet, tmp_path / "dan.csv", lambda *_: "2")
    table = pd.read_csv(tmp_path / "dan.csv", dtype=str, keep_default_na=False)
    table.loc[0, "item_id"] = "item-99"
    table.drop(columns="specificity").to_csv(tmp_path / "erin.csv", index=False)
    table.to_csv(tmp_path / "dan.csv", index=False)
    with pytest.raises(RatingError) as error:
        import_ratings([tmp_path / "dan.csv", tmp_path / "dan.csv", tmp_path / "erin.csv"], key)
    text = str(error.value)
    assert "dan.csv: row 2, column 'item_id': 'item-99' is not an item" in text
    assert "erin.csv: missing column(s) specificity" in text
    assert "rater 'dan' rated" in text and "more than once" in text
    ok = tmp_path / "frank.csv"
    fill(sheet, ok, lambda *_: "4.0")  # what some spreadsheets write for 4
    assert (import_ratings([ok], key)["score"] == 4).all()


# Krippendorff (2011), "Computing Krippendorff's alpha-reliability", the 4 observers x 12
# units example, with its published alphas.
NAN = np.nan
RELIABILITY_DATA = np.array(
    [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
        [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN],
    ]
)


@pytest.mark.parametrize(
    ("level", "alpha"),
    [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849), ("ratio", 0.797)],
)
def test_krippendorff_alpha_on_the_textbook_example(level: str, alpha: float) -> None:
    assert alpha_from_matrix(RELIABILITY_DATA, level) == pytest.approx(alpha, abs=5e-4)


def long_table(matrix: np.ndarray, criterion: str = "consistency") -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"rater": f"r{r}", "model": "m", "patient_id": f"p{u}", "criterion": criterion,
             "score": matrix[r, u]}
            for r in range(matrix.shape[0])
            for u in range(matrix.shape[1])
            if not np.isnan(matrix[r, u])
        ]
    )  # fmt: skip


def test_krippendorff_alpha_from_a_long_table() -> None:
    assert krippendorff_alpha(long_table(RELIABILITY_DATA)) == pytest.approx(0.815, abs=5e-4)
    # Hand-computed nominal case: coincidences o11=2, o12=o21=1, o22=4; n1=3, n2=5, n=8;
    # alpha = 1 - (n - 1) (o12 + o21) / (2 n1 n2) = 1 - 7 * 2 / 30 = 16/30.
    two = np.array([[1, 1, 2, 2], [1, 2, 2, 2]], dtype=float)
    assert krippendorff_alpha(long_table(two), "nominal") == pytest.approx(16 / 30)
    perfect = np.array([[1, 3, 5, 2], [1, 3, 5, 2], [1, 3, NAN, 2]])
    assert krippendorff_alpha(long_table(perfect)) == 1.0
    assert np.isnan(alpha_from_matrix(np.array([[4, 4], [4, 4]]), "ordinal"))  # no variation
    assert np.isnan(alpha_from_matrix(np.array([[1, NAN], [NAN, 2]]), "ordinal"))  # unpairable
    with pytest.raises(ValueError, match="level"):
        alpha_from_matrix(two, "cardinal")


def test_weighted_kappa_matches_sklearn_on_shared_items() -> None:
    rng = np.random.default_rng(0)
    matrix = rng.integers(1, 6, size=(3, 20)).astype(float)
    matrix[2, :5] = NAN  # r2 skipped five items
    out = weighted_kappa(long_table(matrix)).set_index(["rater_a", "rater_b"])
    assert list(out.index) == [("r0", "r1"), ("r0", "r2"), ("r1", "r2")]
    for (a, b), row in out.iterrows():
        x, y = matrix[int(a[1])], matrix[int(b[1])]
        shared = ~np.isnan(x) & ~np.isnan(y)
        expected = cohen_kappa_score(x[shared], y[shared], weights="quadratic")
        assert row["n"] == shared.sum() and row["kappa"] == pytest.approx(expected)


def test_inter_rater_agreement_per_criterion() -> None:
    perfect = np.array([[1, 3, 5, 2], [1, 3, 5, 2]], dtype=float)
    ratings = pd.concat([long_table(RELIABILITY_DATA, "correctness"), long_table(perfect)])
    out = inter_rater_agreement(ratings).set_index("criterion")
    assert list(out.index) == ["consistency", "correctness"]  # the order of CRITERIA
    assert out.loc["consistency"].tolist() == [4, 4, 2, 1.0, 1.0]
    correctness = out.loc["correctness"]
    assert (correctness["n_items"], correctness["n_pairable"], correctness["n_raters"]) == (
        12, 11, 4,
    )  # fmt: skip
    assert correctness["alpha"] == pytest.approx(0.815, abs=5e-4)
    assert 0 < correctness["mean_kappa"] < 1
