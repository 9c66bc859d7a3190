"""Automatic rationale criteria: consistency, specificity and the helpfulness reader."""

from __future__ import annotations

import inspect

import pandas as pd
import pytest

from radiag.cohort.describe import DescribeConfig
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
from radiag.cohort.synthetic import SynthConfig
from radiag.evaluation.criteria import (
    AUTOMATIC,
    CRITERIA,
    SCORE_COLUMNS,
    HelpfulnessReader,
    consistency,
    score_rationales,
    specificity,
)
from radiag.store import RunStore

RECORD = {
    "MMSE": 22.0, "APOE4": 1.0, "age_at_visit": 74.3, "AGE": 73.8, "PTGENDER": "Female",
    "grade_Hippocampus": "Severe", "grade_Entorhinal": "No", "grade_Fusiform": "No",
    "grade_MidTemp": "No", "grade_WholeBrain": "No", "grade_Ventricles": "No", "label": "CN",
}  # fmt: skip
GOOD = (
    "The patient has a Mini-mental State Examination score of 22/30, which indicates cognitive "
    "impairment. The MRI shows severe hippocampal atrophy. Taken together, these findings are "
    "consistent with Alzheimer's disease."
)
GENERIC = "The patient has memory problems."
WRONG = (
    "The MMSE is 29/30, which is normal. Taken together, the findings are consistent with "
    "Alzheimer's disease."
)
CONCLUSION = {
    "AD": "Taken together, these findings are consistent with Alzheimer's disease.",
    "MCI": "Taken together, these findings are consistent with mild cognitive impairment.",
    "CN": "Taken together, these findings are consistent with normal cognition.",
}


def test_the_automatic_criteria_are_three_of_the_papers_five():
    assert len(CRITERIA) == 5 and set(AUTOMATIC) < set(CRITERIA)
    assert "correctness" not in AUTOMATIC and "human_likeness" not in AUTOMATIC


# consistency


def test_rationale_agreeing_with_record_and_prediction_scores_5():
    assert consistency(GOOD, RECORD, "AD") == (5, [])


def test_consistency_is_with_the_prediction_not_the_true_label():
    # RECORD's label is CN, but the model predicted AD and argues AD: consistent.
    assert consistency(GOOD, RECORD, "AD")[0] == 5
    score, reasons = consistency(GOOD, RECORD, "CN")
    assert score == 3 and reasons == ["argues for AD but predicts CN"]


def test_wrong_mmse_and_class_conflict_are_both_listed():
    score, reasons = consistency(WRONG, RECORD, "CN")
    assert score == 2  # 5 - 1 (MMSE) - 2 (class)
    assert reasons == [
        "states MMSE 29/30 but the record says 22/30",
        "argues for AD but predicts CN",
    ]


def test_contradictions_lower_the_score_to_a_floor_of_1():
    text = "The MMSE is 29/30, she has two copies of APOE4 and no hippocampal atrophy. " + WRONG
    score, reasons = consistency(text, RECORD, "CN")
    assert score == 1 and len(reasons) == 4


def test_empty_rationale_scores_1_and_no_prediction_skips_the_class_rule():
    assert consistency("  ", RECORD, "AD") == (1, ["empty rationale"])
    assert consistency(None, RECORD, "AD")[0] == 1
    assert consistency(GOOD, RECORD, None) == (5, [])


# specificity


def test_stated_findings_score_higher_than_a_generic_rationale():
    good, found = specificity(GOOD, RECORD)
    generic, nothing = specificity(GENERIC, RECORD)
    assert found["available"] == ["age", "sex", "MMSE", "APOE4", "atrophy of hippocampus"]
    assert found["stated"] == ["MMSE", "atrophy of hippocampus"]
    assert good == 3 and generic == 1 and nothing["stated"] == []  # 2/5 -> 3, 0/5 -> 1


def test_every_available_finding_stated_scores_5():
    text = "This 74-year-old woman carries one copy of APOE4. " + GOOD
    score, found = specificity(text, RECORD)
    assert score == 5 and found["stated"] == found["available"]


def test_wrong_statements_do_not_count():
    text = (
        "This 64-year-old man has an MMSE of 29/30, two copies of APOE4 and no hippocampal atrophy."
    )
    assert specificity(text, RECORD)[1]["stated"] == []


def test_a_stated_degree_must_match_the_grade():
    mild = {**RECORD, "grade_Hippocampus": "Mild"}
    assert specificity("There is hippocampal atrophy.", mild)[1]["stated"] == [
        "atrophy of hippocampus"
    ]
    assert specificity("There is mild hippocampal atrophy.", mild)[1]["stated"] != []
    assert specificity("There is severe hippocampal atrophy.", mild)[1]["stated"] == []
    assert specificity("There is mild hippocampal atrophy.", RECORD)[1]["stated"] == []


def test_missing_record_values_are_not_available():
    record = {"MMSE": float("nan"), "APOE4": None, "PTGENDER": pd.NA, "grade_Hippocampus": None}
    assert specificity(GOOD, record) == (1, {"available": [], "stated": []})


# helpfulness


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    """Train and test rows of a small synthetic cohort, with real descriptions."""
    store = RunStore(str(tmp_path_factory.mktemp("criteria-run")))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=60, max_visits=1)), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    return {
        name: store.read_table(f"splits/{name}.parquet").to_pandas().set_index("patient_id")
        for name in ("train", "test")
    }


@pytest.fixture(scope="module")
def reader(splits: dict[str, pd.DataFrame]) -> HelpfulnessReader:
    """Fitted on training rows whose rationales carry the label, as the teacher's do."""
    train = splits["train"].dropna(subset=["label"])
    return HelpfulnessReader.fit(
        list(train["description"]),
        [CONCLUSION[label] for label in train["label"]],
        list(train["label"]),
    )


def test_reader_is_fitted_on_training_data_only():
    assert list(inspect.signature(HelpfulnessReader.fit).parameters) == [
        "descriptions",
        "rationales",
        "labels",
    ]
    with pytest.raises(ValueError, match="two classes"):
        HelpfulnessReader.fit(["a", "b"], ["x", "y"], ["AD", "AD"])


def test_rationale_pointing_to_the_true_class_is_more_helpful(
    splits: dict[str, pd.DataFrame], reader: HelpfulnessReader
):
    test = splits["test"].dropna(subset=["label"])
    assert len(test) >= 5
    for description, label in zip(test["description"], test["label"], strict=True):
        right, right_gain = reader.score(description, CONCLUSION[label], label)
        for other in set(CONCLUSION) - {label}:
            wrong, wrong_gain = reader.score(description, CONCLUSION[other], label)
            assert right_gain > 0 > wrong_gain and right > wrong and right >= 4


def test_a_rationale_the_reader_cannot_read_is_neutral(
    splits: dict[str, pd.DataFrame], reader: HelpfulnessReader
):
    for description, label in zip(
        splits["test"]["description"], splits["test"]["label"], strict=True
    ):
        score, gain = reader.score(description, "Zzz qqq.", label)
        assert score == 3 and abs(gain) < 0.05


def test_reader_scores_are_deterministic_and_blank_rationales_score_1(
    splits: dict[str, pd.DataFrame], reader: HelpfulnessReader
):
    description = splits["test"]["description"].iloc[0]
    assert reader.score(description, CONCLUSION["AD"], "AD") == reader.score(
        description, CONCLUSION["AD"], "AD"
    )
    assert reader.score(description, "", "AD")[0] == 1
    with pytest.raises(ValueError, match="not seen in training"):
        reader.score(description, CONCLUSION["AD"], "FTD")


# the long table


def test_score_rationales_writes_one_row_per_model_patient_and_criterion(
    splits: dict[str, pd.DataFrame], reader: HelpfulnessReader
):
    test = splits["test"].dropna(subset=["label"]).head(4)
    ids = list(test.index)
    rows = pd.DataFrame(
        {
            "patient_id": ids * 2,
            "model": ["teacher"] * 4 + ["student-a"] * 4,
            "rationale": [CONCLUSION[y] for y in test["label"]] + [GENERIC, None, "", GENERIC],
            "diagnosis": [*test["label"], "AD", None, "CN", None],
        }
    )
    records = splits["test"].copy()
    records.loc[ids[3], "description"] = None  # a missing description reads as empty
    table = score_rationales(rows, records, reader, test["label"])
    assert tuple(table.columns) == SCORE_COLUMNS
    assert len(table) == 7 * 3  # the null rationale is skipped
    assert (table["source"] == "automatic").all() and table["score"].between(1, 5).all()
    assert table["score"].dtype == "int64"
    first = table[(table["model"] == "teacher") & (table["patient_id"] == min(ids))]
    assert list(first["criterion"]) == list(AUTOMATIC)
    blank = table[(table["model"] == "student-a") & (table["patient_id"] == ids[2])]
    assert list(blank["score"]) == [1, 1, 1]

    assert score_rationales(rows.head(0), records, reader, test["label"]).empty
    without_reader = score_rationales(rows, splits["test"], None, None)
    assert set(without_reader["criterion"]) == {"consistency", "specificity"}
    with pytest.raises(ValueError, match="no record"):
        score_rationales(rows.assign(patient_id="nobody"), splits["test"], None, None)


def test_module_docstring_states_every_rule():
    import radiag.evaluation.criteria as criteria

    doc = criteria.__doc__ or ""
    for fragment in ("consistency", "specificity", "helpfulness", "LLM judge", "-0.2", "0.75"):
        assert fragment in doc
