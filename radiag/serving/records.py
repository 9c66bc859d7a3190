"""What a client sends and gets back, and the patient description built from it.

A request carries one patient record in the canonical visit schema (ADNIMERGE names,
the same ranges as ingest validation); fields that name a diagnosis (`label`, `DX`,
`DX_bl`) are not part of a record, so a label cannot reach any model. The description
is made by the batch pipeline's own `describe` on a one-row table.
"""

from __future__ import annotations

import datetime
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, create_model

from radiag.cohort.describe import DescribeConfig, NormativeModel, describe
from radiag.cohort.schema import COHORT_SCHEMA, COLUMNS, Column, Label
from radiag.teacher.parsing import parse_answer
from radiag.teacher.prompts import FINAL
from radiag.teacher.quality import argued_class

LABEL_COLUMNS = frozenset({"label", "DX", "DX_bl"})
"""Never in a record: a diagnosis request must not carry the answer."""
CLINICAL_FIELDS = frozenset({
    "APOE4", "MMSE", "CDRSB", "ADAS13", "FAQ", "MOCA", "Ventricles", "Hippocampus", "WholeBrain",
    "Entorhinal", "Fusiform", "MidTemp", "ABETA", "TAU", "PTAU", "FDG", "AV45",
})  # fmt: skip
"""Findings a diagnosis rests on (not demographics, dates or the intracranial volume)."""
MIN_CLINICAL_FIELDS = 2
SERVED_COLUMNS = tuple(
    c for c in COLUMNS if c.name not in LABEL_COLUMNS | {"mri_path", "source", "patient_id"}
)


def record_fields(columns: set[str]) -> list[str]:
    """The record fields that give `columns`, in the record's order (a visit's age comes
    from AGE + Years_bl when the record has no age_at_visit)."""
    wanted = columns | ({"AGE", "Years_bl"} if "age_at_visit" in columns else set())
    return [c.name for c in SERVED_COLUMNS if c.name in wanted]


_PY = {pa.string(): str, pa.int64(): int, pa.float64(): float, pa.date32(): datetime.date}


def _optional(column: Column) -> tuple[Any, Any]:
    kind = _PY[column.type]
    if column.allowed:
        kind = Literal[column.allowed]  # type: ignore[valid-type]
    return kind | None, Field(None, description=column.doc, ge=column.low, le=column.high)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PatientRecord: type[BaseModel] = create_model(
    "PatientRecord", __base__=_Strict, **{c.name: _optional(c) for c in SERVED_COLUMNS}
)
PatientRecord.__doc__ = "One visit's facts, every field optional, unknown fields refused."


class DiagnoseRequest(_Strict):
    """POST /v1/diagnose: a model of the run, a patient, optionally where its T1 is."""

    model: str = Field(description="teacher, student-text, student-vlm or baseline-<...>")
    patient: PatientRecord  # type: ignore[valid-type]
    patient_id: str = Field(
        "request",
        max_length=128,
        pattern=r"^[^\x00-\x1f\x7f]*$",
        description="echoed back; for your logs (no control characters: it is logged)",
    )
    mri_uri: str | None = Field(
        None, max_length=2048, description="a T1 NIfTI under an allowed storage prefix"
    )


class DiagnoseResponse(BaseModel):
    """What one model concluded for one patient, and which model (stage identity) it was."""

    model: str
    identity: str
    patient_id: str
    description: str
    rationale: str | None = None
    diagnosis: Label | None = None
    probabilities: dict[Label, float] | None = None
    parse_error: str | None = None
    decision: Literal["balanced", "validation", "most_probable"] | None = Field(
        None,
        description="how a student chose its diagnosis from the probabilities: balanced "
        "(the greatest probability over its share of the training rows, so not always the "
        "greatest one), validation (the greatest log-probability plus a per-class offset "
        "fitted on the run's val split) or most_probable; null where the model answers "
        "otherwise",
    )
    mri_used: bool = False
    exemplar_ids: list[str] | None = None
    argued_class: Label | None = Field(
        None, description="the class the rationale argues for, when it is not the answer"
    )
    warnings: list[str] = Field(
        default_factory=list, description="what the answer must not hide; the page shows them"
    )
    batch_size: int | None = Field(
        None, description="requests the model answered together (students, baselines)"
    )
    latency_s: float = 0.0


def record_table(record: BaseModel, patient_id: str = "request") -> pa.Table:
    """A one-row cohort table (every canonical column) for a patient record."""
    values = {c.name: None for c in COLUMNS} | record.model_dump()
    values |= {"patient_id": patient_id, "source": "request", "RID": 0, "VISCODE": "bl"}
    if values["age_at_visit"] is None and values["AGE"] is not None:
        values["age_at_visit"] = values["AGE"] + (values["Years_bl"] or 0.0)  # as ingest does
    return pa.Table.from_pylist([values], schema=COHORT_SCHEMA)


def describe_record(
    record: BaseModel, cfg: DescribeConfig, norm: NormativeModel, patient_id: str = "request"
) -> pa.Table:
    """The record with `description` and the graded MRI columns, as the splits stage makes them
    (`norm`: the run's, `radiag.cohort.stages.run_norm`)."""
    return describe(record_table(record, patient_id), cfg, norm)


def answer_warnings(
    record: BaseModel, rationale: str | None, diagnosis: str | None
) -> tuple[str | None, list[str]]:
    """The class a rationale argues for when it is not the answer (the QC rule the batch
    stages flag), and warnings: that conflict, and a record too thin to diagnose."""
    warnings = []
    given = sorted(
        k for k, v in record.model_dump().items() if v is not None and k in CLINICAL_FIELDS
    )
    if len(given) < MIN_CLINICAL_FIELDS:
        warnings.append(
            f"the record has {len(given)} clinical finding(s) ({', '.join(given) or 'none'}); "
            f"a diagnosis needs at least {MIN_CLINICAL_FIELDS}: this answer is a guess"
        )
    argued = None
    if rationale and diagnosis:
        reasoning = rationale.partition(FINAL)[0]  # the served teacher's final line is forced
        for stated in (argued_class(reasoning), parse_answer(rationale).diagnosis):
            if stated is not None and str(stated) != diagnosis:
                argued = str(stated)
                warnings.append(f"the rationale argues for {argued} but the answer is {diagnosis}")
                break
    return argued, warnings
