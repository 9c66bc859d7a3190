"""The canonical patient-visit schema, named after ADNIMERGE columns.

One list of `Column`s is the single source of truth: the pyarrow schema of the
cohort table, the pydantic `Visit` model (one record, e.g. a serving request)
and the range checks of validation are all derived from it.

One row is one visit of one subject: `RID` identifies the subject (splits are by
subject), `patient_id` = "<source>-<RID>-<VISCODE>" is the stable key every stage
table is keyed by.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, create_model


class Label(StrEnum):
    """The 3-class diagnosis of the paper (it writes NC for CN)."""

    AD = "AD"
    MCI = "MCI"
    CN = "CN"


# Raw diagnosis codes -> label. DX_bl is the baseline diagnosis (ADNI-GO/2 split MCI
# into EMCI/LMCI and added SMC, subjective memory concern, cognitively normal);
# DX is the per-visit diagnosis (older exports used NL and transition strings
# such as "MCI to Dementia", of which the current state is the part after " to ").
DX_BL_LABELS = {
    "CN": Label.CN,
    "SMC": Label.CN,
    "EMCI": Label.MCI,
    "LMCI": Label.MCI,
    "AD": Label.AD,
}
DX_LABELS = {
    "CN": Label.CN, "NL": Label.CN, "MCI": Label.MCI, "DEMENTIA": Label.AD, "AD": Label.AD,
}  # fmt: skip


@dataclass(frozen=True)
class Column:
    """One cohort column: its type, its plausible range, and what it means."""

    name: str
    type: pa.DataType
    doc: str
    low: float | None = None
    high: float | None = None
    allowed: tuple[str, ...] | None = None
    required: bool = False


_F = pa.float64()
COLUMNS: tuple[Column, ...] = (
    Column("patient_id", pa.string(), "<source>-<RID>-<VISCODE>, the key of every table", required=True),
    Column("source", pa.string(), "cohort the row came from: adni, aibl, synthetic, ...", required=True),
    Column("RID", pa.int64(), "subject (roster) id; splits are by subject", 0, 10**9, required=True),
    Column("PTID", pa.string(), "site_S_RID"),
    Column("VISCODE", pa.string(), "visit code: bl, m06, m12, ...", required=True),
    Column("EXAMDATE", pa.date32(), "visit date"),
    Column("Years_bl", _F, "years since baseline", 0, 30),
    Column("DX_bl", pa.string(), "baseline diagnosis as exported"),
    Column("DX", pa.string(), "visit diagnosis as exported"),
    Column("label", pa.string(), "CN / MCI / AD; null = unlabeled visit", allowed=tuple(Label)),
    Column("AGE", _F, "age at baseline (ADNIMERGE convention)", 40, 110),
    Column("age_at_visit", _F, "AGE + Years_bl", 40, 120),
    Column("PTGENDER", pa.string(), "Male / Female", allowed=("Male", "Female")),
    Column("PTEDUCAT", _F, "years of education", 0, 30),
    Column("PTMARRY", pa.string(), "marital status", allowed=("Married", "Widowed", "Divorced", "Never married")),
    Column("APOE4", _F, "number of APOE e4 alleles", 0, 2),
    Column("MMSE", _F, "Mini-Mental State Examination", 0, 30),
    Column("CDRSB", _F, "Clinical Dementia Rating, sum of boxes", 0, 18),
    Column("ADAS13", _F, "ADAS-Cog 13", 0, 85),
    Column("FAQ", _F, "Functional Activities Questionnaire", 0, 30),
    Column("MOCA", _F, "Montreal Cognitive Assessment", 0, 30),
    Column("Ventricles", _F, "ventricular volume, mm^3", 2_000, 300_000),
    Column("Hippocampus", _F, "hippocampal volume (both sides), mm^3", 1_500, 13_000),
    Column("WholeBrain", _F, "whole-brain volume, mm^3", 500_000, 1_800_000),
    Column("Entorhinal", _F, "entorhinal volume, mm^3", 300, 7_500),
    Column("Fusiform", _F, "fusiform volume, mm^3", 5_000, 35_000),
    Column("MidTemp", _F, "middle temporal volume, mm^3", 5_000, 40_000),
    Column("ICV", _F, "intracranial volume, mm^3", 900_000, 2_500_000),
    Column("ABETA", _F, "CSF amyloid-beta 1-42, pg/mL (censored exports clipped at the bound)", 50, 5_000),
    Column("TAU", _F, "CSF total tau, pg/mL", 20, 2_500),
    Column("PTAU", _F, "CSF phospho-tau 181, pg/mL", 2, 250),
    Column("FDG", _F, "FDG-PET ROI average", 2, 12),
    Column("AV45", _F, "florbetapir SUVR", 0.5, 3),
    Column("mri_path", pa.string(), "T1 NIfTI of this visit, if any (local path or s3:// URI)"),
)  # fmt: skip

COLUMN_BY_NAME = {c.name: c for c in COLUMNS}
COHORT_SCHEMA = pa.schema([pa.field(c.name, c.type, nullable=not c.required) for c in COLUMNS])
NUMERIC_COLUMNS = tuple(c.name for c in COLUMNS if pa.types.is_floating(c.type))
VOLUME_COLUMNS = (
    "Ventricles",
    "Hippocampus",
    "WholeBrain",
    "Entorhinal",
    "Fusiform",
    "MidTemp",
    "ICV",
)

_PY_TYPES: dict[pa.DataType, type] = {
    pa.string(): str, pa.int64(): int, pa.float64(): float, pa.date32(): datetime.date,
}  # fmt: skip


def _field(column: Column) -> tuple[Any, Any]:
    py_type = _PY_TYPES[column.type]
    annotation = py_type if column.required else py_type | None
    return annotation, Field(
        ... if column.required else None, description=column.doc, ge=column.low, le=column.high
    )


class _VisitBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Visit: type[BaseModel] = create_model(
    "Visit", __base__=_VisitBase, **{c.name: _field(c) for c in COLUMNS}
)
Visit.__doc__ = "One patient visit, validated field by field (derived from COLUMNS)."
