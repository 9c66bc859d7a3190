"""A request's patient record: the canonical visit schema, checked before any model sees it."""

from __future__ import annotations

import datetime

import pytest
from pydantic import ValidationError

from radiag.serving.records import (
    DiagnoseRequest,
    PatientRecord,
    answer_warnings,
    record_table,
)

pytestmark = pytest.mark.reliability


@pytest.mark.parametrize("value", ["yesterday", "2024-02-30", "", "03/12/2024", 20240301])
def test_an_examdate_that_is_not_an_iso_date_is_refused_by_name(value: object) -> None:
    with pytest.raises(ValidationError) as refused:
        PatientRecord.model_validate({"EXAMDATE": value})
    (error,) = refused.value.errors()
    assert error["loc"] == ("EXAMDATE",) and "date" in error["msg"]


def test_an_iso_examdate_reaches_the_cohort_table_as_a_date() -> None:
    table = record_table(PatientRecord.model_validate({"EXAMDATE": "2024-02-29", "AGE": 70}))
    assert table["EXAMDATE"].to_pylist() == [datetime.date(2024, 2, 29)]


def test_the_request_schema_documents_the_date_format() -> None:
    schema = PatientRecord.model_json_schema()["properties"]["EXAMDATE"]
    assert {"type": "string", "format": "date"} in schema["anyOf"]


def test_a_patient_id_with_a_control_character_is_refused_so_it_cannot_forge_a_log_line() -> None:
    forged = "s-1\n2026-12-03 INFO diagnosed 's-2' with teacher"
    with pytest.raises(ValidationError) as refused:
        DiagnoseRequest.model_validate({"model": "teacher", "patient": {}, "patient_id": forged})
    assert [error["loc"] for error in refused.value.errors()] == [("patient_id",)]


def test_a_thin_record_is_answered_with_a_warning_that_names_what_it_holds() -> None:
    _, warnings = answer_warnings(PatientRecord.model_validate({"AGE": 70, "MMSE": 22}), None, "AD")
    assert warnings == [
        "the record has 1 clinical finding(s) (MMSE); a diagnosis needs at least 2: "
        "this answer is a guess"
    ]
    full = PatientRecord.model_validate({"AGE": 70, "MMSE": 22, "APOE4": 1})
    assert answer_warnings(full, "The MMSE and APOE4 point to AD.", "AD") == (None, [])


@pytest.mark.parametrize(
    "rationale",
    [
        "The MMSE of 27 is near normal. These findings suggest mild cognitive impairment.\n"
        "Final Diagnosis: (C) Normal Cognition",  # the teacher's forced final line
        "Memory is intact.\nFinal Diagnosis: (C) Normal Cognition",  # a student's own line
    ],
    ids=["reasoning", "final line"],
)
def test_an_answer_its_rationale_argues_against_is_flagged_with_the_argued_class(
    rationale: str,
) -> None:
    record = PatientRecord.model_validate({"MMSE": 27, "APOE4": 0})
    diagnosis = "CN" if "mild cognitive" in rationale else "AD"
    argued, warnings = answer_warnings(record, rationale, diagnosis)
    assert argued == ("MCI" if diagnosis == "CN" else "CN")
    assert warnings == [f"the rationale argues for {argued} but the answer is {diagnosis}"]
