"""A request's patient record: the canonical visit schema, checked before any model sees it."""

from __future__ import annotations

import datetime

import pytest
from pydantic import ValidationError

from radiag.serving.records import DiagnoseRequest, PatientRecord, record_table


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
