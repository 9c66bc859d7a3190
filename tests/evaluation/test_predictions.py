"""Prediction tables are checked before scoring; a bad one is named, and spares the others."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from radiag.evaluation import predictions
from radiag.evaluation.metrics import evaluate_model
from radiag.evaluation.predictions import (
    EvaluationInputError,
    load_model,
    load_predictions,
    model_names,
)
from radiag.outputs import OUTPUT_SCHEMA, predictions_dir, write_part
from radiag.store import RunStore

LABELS = {
    "adni-1-bl": "AD",
    "adni-2-bl": "MCI",
    "adni-3-bl": "CN",
    "adni-4-bl": "AD",
    "adni-5-bl": None,
}  # adni-5-bl: unlabelled
TEST_IDS = set(LABELS)


def row(patient_id: str, diagnosis: str | None, **fields: object) -> dict[str, object]:
    return {"patient_id": patient_id, "model": "m", "diagnosis": diagnosis, **fields}


def only_part(store: RunStore, model: str) -> str:
    (part,) = store.list_files(predictions_dir(model), suffix=".parquet")
    return store.uri_of(part)


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    store = RunStore(str(tmp_path / "run"))
    split = pa.table({"patient_id": list(LABELS), "label": list(LABELS.values())})
    store.write_table("splits/test.parquet", split)
    return store


def test_test_labels_are_the_labelled_test_rows(store: RunStore) -> None:
    labels = predictions.test_labels(store)
    assert labels.to_dict() == {
        "adni-1-bl": "AD",
        "adni-2-bl": "MCI",
        "adni-3-bl": "CN",
        "adni-4-bl": "AD",
    }


def test_a_missing_split_is_named(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path / "empty"))
    with pytest.raises(EvaluationInputError, match=r"splits/test\.parquet not found"):
        load_predictions(store)


def test_model_names_are_the_folders_holding_part_files(store: RunStore) -> None:
    write_part(store, predictions_dir("teacher"), [row("adni-1-bl", "AD")])
    write_part(store, predictions_dir("student-text"), [row("adni-1-bl", "AD", p_AD=0.9)])
    Path(store.path("predictions/empty")).mkdir(parents=True)
    assert model_names(store) == ["student-text", "teacher"]


def test_a_model_loads_from_all_its_parts_in_the_output_schema(store: RunStore) -> None:
    directory = predictions_dir("student-text")
    write_part(store, directory, [row("adni-3-bl", "CN", p_AD=0.1, p_MCI=0.2, p_CN=0.7)])
    write_part(
        store,
        directory,
        [row("adni-1-bl", None, parse_error="no final answer"), row("adni-5-bl", "AD")],
    )

    frame = load_model(store, "student-text", TEST_IDS)

    assert list(frame.columns) == OUTPUT_SCHEMA.names
    assert list(frame["patient_id"]) == ["adni-1-bl", "adni-3-bl", "adni-5-bl"]
    assert frame.loc[1, "p_CN"] == 0.7
    assert frame["p_CN"].isna().sum() == 2


def test_probability_and_provenance_columns_are_optional(store: RunStore) -> None:
    table = pa.table(
        {"patient_id": ["adni-1-bl"], "diagnosis": ["AD"], "error": [None], "parse_error": [None]},
        schema=pa.schema([(name, pa.string()) for name in predictions.REQUIRED_COLUMNS]),
    )
    store.write_table("predictions/minimal/part-0.parquet", table)

    frame = load_model(store, "minimal", TEST_IDS)

    assert frame[["p_AD", "p_MCI", "p_CN"]].isna().all().all()


def test_an_unknown_diagnosis_names_the_file_and_rows(store: RunStore) -> None:
    rows = [row("adni-1-bl", "Dementia"), row("adni-2-bl", "MCI"), row("adni-4-bl", "Dementia")]
    write_part(store, predictions_dir("teacher"), rows)

    with pytest.raises(EvaluationInputError) as caught:
        load_model(store, "teacher", TEST_IDS)

    message = str(caught.value)
    assert only_part(store, "teacher") in message
    assert "2 rows (adni-1-bl: 'Dementia', adni-4-bl: 'Dementia')" in message
    assert "adni-2-bl" not in message


def test_a_missing_column_is_reported_not_a_cast_error(store: RunStore) -> None:
    table = pa.table({"patient_id": ["adni-1-bl"], "diagnosis": ["AD"]})  # no error, parse_error
    store.write_table("predictions/old/part-0.parquet", table)

    with pytest.raises(EvaluationInputError) as caught:
        load_model(store, "old", TEST_IDS)

    message = str(caught.value)
    assert store.uri_of("predictions/old/part-0.parquet") in message
    assert "error, parse_error" in message


def test_a_patient_outside_the_test_split_is_named(store: RunStore) -> None:
    rows = [row("adni-1-bl", "AD"), *(row(f"TRAIN-{i}", "CN") for i in range(7))]
    write_part(store, predictions_dir("baseline-logistic-tabular"), rows)

    with pytest.raises(EvaluationInputError) as caught:
        load_model(store, "baseline-logistic-tabular", TEST_IDS)

    message = str(caught.value)
    assert only_part(store, "baseline-logistic-tabular") in message
    assert "not in " + store.uri_of("splits/test.parquet") in message
    assert "7 rows (TRAIN-0, TRAIN-1, TRAIN-2, TRAIN-3, TRAIN-4, and 2 more)" in message


def test_a_patient_predicted_twice_names_both_parts(store: RunStore) -> None:
    write_part(store, predictions_dir("student-vlm"), [row("adni-1-bl", "AD")])
    write_part(
        store, predictions_dir("student-vlm"), [row("adni-1-bl", "CN"), row("adni-2-bl", "MCI")]
    )

    with pytest.raises(EvaluationInputError) as caught:
        load_model(store, "student-vlm", TEST_IDS)

    message = str(caught.value)
    for part in store.list_files(predictions_dir("student-vlm"), suffix=".parquet"):
        assert store.uri_of(part) in message
    assert "2 rows (adni-1-bl, adni-1-bl)" in message


def test_load_predictions_keeps_the_good_models_and_reports_the_bad(store: RunStore) -> None:
    write_part(
        store,
        predictions_dir("teacher"),
        [row(p, "AD") for p in ("adni-1-bl", "adni-2-bl", "adni-3-bl")],
    )
    proba = {"p_AD": 0.2, "p_MCI": 0.7, "p_CN": 0.1}
    write_part(store, predictions_dir("student-text"), [row("adni-2-bl", "MCI", **proba)])
    write_part(store, predictions_dir("student-vlm"), [row("adni-1-bl", "Dementia")])
    store.write_table("predictions/broken/part-0.parquet", pa.table({"patient_id": ["adni-1-bl"]}))

    models, problems = load_predictions(store)

    assert sorted(models) == ["student-text", "teacher"]
    assert len(problems) == 2
    assert "'broken'" in problems[0] and "diagnosis" in problems[0]
    assert "'student-vlm'" in problems[1] and "Dementia" in problems[1]
    truth = predictions.test_labels(store)
    teacher = evaluate_model("teacher", models["teacher"], truth, n_boot=10).metrics
    assert (teacher["n"], teacher["coverage"]) == (3, 0.75)
    assert teacher["accuracy"] == pytest.approx(1 / 3)


def test_an_s3_run_loads_and_names_s3_files(s3_endpoint: str) -> None:
    store = RunStore("s3://radiag/evaluation-test")
    store.write_table(
        "splits/test.parquet", pa.table({"patient_id": ["adni-1-bl"], "label": ["AD"]})
    )
    write_part(store, predictions_dir("teacher"), [row("adni-1-bl", "AD")])
    write_part(store, predictions_dir("student-text"), [row("adni-9-bl", "AD")])

    models, problems = load_predictions(store)

    assert list(models) == ["teacher"]
    assert problems[0].startswith("predictions of 'student-text' in s3://radiag/evaluation-test/")
    part = only_part(store, "student-text")
    assert part.startswith("s3://radiag/evaluation-test/predictions/") and part in problems[0]


def test_a_retried_transient_failure_counts_once_as_its_newest_row(store: RunStore) -> None:
    """Two runs failed with a 503 and a third succeeded: the patient is scored once, as the
    retry; a patient whose retries all failed keeps its newest failure (not dropped)."""
    directory = predictions_dir("teacher")
    failed = {"error": "HTTP 503", "transient": True}
    write_part(store, directory, [row("adni-1-bl", None, created_at="1", **failed),
                                  row("adni-2-bl", None, created_at="1", **failed)])  # fmt: skip
    write_part(store, directory, [row("adni-1-bl", None, created_at="2", **failed)])
    write_part(store, directory, [row("adni-1-bl", "AD", created_at="3"),
                                  row("adni-2-bl", None, created_at="2", **failed)])  # fmt: skip

    frame = load_model(store, "teacher", TEST_IDS).set_index("patient_id")
    assert list(frame.index) == ["adni-1-bl", "adni-2-bl"]
    assert frame.loc["adni-1-bl", "diagnosis"] == "AD"
    assert frame.loc["adni-2-bl", "error"] == "HTTP 503"


def test_a_patient_predicted_twice_without_a_retry_is_still_a_problem(store: RunStore) -> None:
    directory = predictions_dir("teacher")
    write_part(store, directory, [row("adni-1-bl", "AD", created_at="1")])
    write_part(store, directory, [row("adni-1-bl", "CN", created_at="2"), row("adni-2-bl", "MCI")])
    with pytest.raises(EvaluationInputError, match="predicted twice"):
        load_model(store, "teacher", TEST_IDS)
