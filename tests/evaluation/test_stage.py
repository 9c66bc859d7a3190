"""`radiag evaluate` on a run: every model present is compared, a bad table is named and left
out, and reports/ holds the tables, plots and the HTML report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from radiag.baseline import BaselineConfig, run_baseline
from radiag.cohort.describe import DescribeConfig
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
from radiag.cohort.synthetic import SynthConfig
from radiag.evaluation.stage import EvaluateConfig, run_evaluate
from radiag.outputs import write_part
from radiag.store import RunStore


def _rationale(row: dict, label: str) -> str:
    return (
        f"The MMSE is {row['MMSE']:.0f} and the hippocampus shows "
        f"{str(row['grade_Hippocampus']).lower()} atrophy; this is consistent with {label}."
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunStore:
    """Splits, teacher rationales, a teacher and a student that predict, the baselines,
    and one model whose table holds a label the evaluation does not know."""
    store = RunStore(str(tmp_path_factory.mktemp("evaluate") / "run"))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=150, max_visits=1)), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    train = store.read_table("splits/train.parquet").to_pylist()
    write_part(store, "rationales", [
        {"patient_id": r["patient_id"], "rationale": _rationale(r, r["label"]),
         "diagnosis": r["label"], "label_shown": r["label"], "qc_flagged": False}
        for r in train if r["label"]
    ])  # fmt: skip
    test = store.read_table("splits/test.parquet").to_pylist()
    rng = np.random.default_rng(0)
    teacher, student = [], []
    for r in test:
        guess = r["label"] if rng.random() < 0.6 else "CN"
        teacher.append({"patient_id": r["patient_id"], "model": "teacher", "diagnosis": guess,
                        "rationale": _rationale(r, guess)})  # fmt: skip
        probs = rng.dirichlet([1, 1, 1])
        student.append({"patient_id": r["patient_id"], "model": "student-text",
                        "diagnosis": ["AD", "MCI", "CN"][int(probs.argmax())],
                        "p_AD": probs[0], "p_MCI": probs[1], "p_CN": probs[2],
                        "rationale": "Memory complaints."})  # fmt: skip
    teacher[0] |= {"diagnosis": None, "parse_error": "no 'Final Diagnosis: (X)' line"}
    write_part(store, "predictions/teacher", teacher)
    write_part(store, "predictions/student-text", student)
    write_part(store, "predictions/broken", [{"patient_id": test[0]["patient_id"],
                                              "diagnosis": "Dementia"}])  # fmt: skip
    run_baseline(BaselineConfig(classifiers=["logistic"]), store)
    return store


@pytest.fixture(scope="module")
def summary(run: RunStore):
    return run_evaluate(EvaluateConfig(bootstrap=200), run)


def test_every_valid_model_is_compared_and_the_bad_table_is_named(run: RunStore, summary) -> None:
    metrics = pd.read_csv(run.path("reports/metrics.csv")).set_index("model")
    assert {"teacher", "student-text", "baseline-logistic-tabular"} <= set(metrics.index)
    assert "broken" not in metrics.index
    (problem,) = summary.details["problems"]
    assert "predictions/broken" in problem and "Dementia" in problem
    assert metrics.loc["teacher", "unparsed"] == 1  # counted wrong, reported apart
    assert np.isnan(metrics.loc["teacher", "mauc"])  # no probabilities
    assert 0 <= metrics.loc["student-text", "mauc"] <= 1
    lo, acc, hi = metrics.loc["teacher", ["accuracy_lo", "accuracy", "accuracy_hi"]]
    assert lo <= acc <= hi


def test_rationales_are_scored_and_a_blinded_rating_sheet_is_exported(run: RunStore) -> None:
    criteria = pd.read_csv(run.path("reports/criteria.csv"))
    scored = criteria.groupby("model")["criterion"].unique()
    assert set(scored["teacher"]) == {"consistency", "specificity", "helpfulness"}
    assert criteria["score"].between(1, 5).all()
    mean = criteria.groupby(["model", "criterion"])["score"].mean()
    assert mean["teacher", "specificity"] > mean["student-text", "specificity"]
    sheet = Path(run.path("reports/human/rating_sheet.csv")).read_text()
    assert "teacher" not in sheet and "student-text" not in sheet  # blinded


def test_reports_hold_tables_plots_and_one_html_page(run: RunStore, summary) -> None:
    reports = Path(run.path("reports"))
    for table in ("metrics", "per_class", "paired", "criteria", "cohort_summary"):
        assert (reports / f"{table}.parquet").is_file() and (reports / f"{table}.csv").is_file()
    assert json.loads((reports / "metrics.json").read_text())["models"]
    assert list((reports / "plots").glob("*.png"))
    page = (reports / "report.html").read_text()
    assert summary.details["report"].endswith("report.html")
    for section in ("manifest", "cohort", "models", "confusion", "criteria", "examples"):
        assert f'id="{section}"' in page


def test_the_command_line_evaluates_a_run_and_prints_the_report(run: RunStore) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "radiag.cli", "evaluate", "--run", run.uri, "--set",
         "evaluate={bootstrap: 50}", "--fresh"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "report:" in result.stderr and "report.html" in result.stderr
    assert "not evaluated:" in result.stderr and "broken" in result.stderr
    assert "smoke run: teacher:" in result.stderr  # a test split of a few dozen patients


def test_filled_rating_sheets_are_imported_with_their_agreement(
    run: RunStore, tmp_path: Path
) -> None:
    sheet = pd.read_csv(run.path("reports/human/rating_sheet.csv"))
    criteria = ["consistency", "correctness", "specificity", "helpfulness", "human_likeness"]
    sheets = []
    for rater, shift in (("rater_a", 0), ("rater_b", 1)):
        filled = sheet.copy()
        for i, criterion in enumerate(criteria):
            filled[criterion] = [(n + i + shift * (n % 2)) % 5 + 1 for n in range(len(sheet))]
        sheets.append(tmp_path / f"{rater}.csv")
        filled.to_csv(sheets[-1], index=False)

    summary = run_evaluate(
        EvaluateConfig(bootstrap=50, human_ratings=[str(p) for p in sheets]), run, fresh=True
    )

    assert summary.counts["human_ratings"] > 0
    agreement = pd.read_csv(run.path("reports/agreement.csv"))
    raters = agreement[agreement["pair"] == "between human raters"]
    assert set(raters["criterion"]) == set(criteria) and raters["alpha"].between(-1, 1).all()
    scored = pd.read_csv(run.path("reports/criteria.csv"))
    assert (scored["source"] == "human").any()
