"""Column mappings: how a cohort CSV's columns become the canonical schema.

A user with another dataset writes one YAML (see configs/mappings/example.yaml)
instead of code. The ADNIMERGE and AIBL readers use bundled mappings too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from radiag.cohort.schema import COLUMN_BY_NAME, Label
from radiag.config import StrictModel, load_config

MAPPINGS_DIR = Path(__file__).with_name("mappings")


class LabelMap(StrictModel):
    """The label comes from one raw column through a value map (unmapped values = unlabeled)."""

    column: str = Field(description="raw column holding the diagnosis")
    map: dict[str, Label] = Field(description="raw value -> CN / MCI / AD")


class ColumnMapping(StrictModel):
    """How one cohort file maps onto the canonical schema."""

    source: str = Field(
        pattern=r"^[a-z0-9_]+$", description="cohort name, part of every patient_id"
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="raw column -> canonical column; unlisted canonical names pass through",
    )
    values: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="canonical column -> {raw value: canonical value}"
    )
    units: dict[str, float] = Field(
        default_factory=dict,
        description="canonical column -> factor to canonical units (cm^3 -> mm^3: 1000)",
    )
    missing: list[str] = Field(
        default_factory=lambda: ["", "NA", "N/A", "nan", "-4", "-1"],
        description="raw tokens meaning 'not recorded' (ADNI/AIBL use -4 and -1)",
    )
    labels: Literal["adni"] | LabelMap = Field(
        "adni", description="'adni' = DX per visit, else DX_bl at baseline; or a LabelMap"
    )
    age_at: Literal["baseline", "visit"] = Field(
        "baseline", description="whether AGE is the age at baseline (ADNIMERGE) or at the visit"
    )

    @model_validator(mode="after")
    def _targets_are_canonical(self) -> ColumnMapping:
        unknown = {t for t in self.columns.values() if t not in COLUMN_BY_NAME and t != "label"}
        unknown |= {c for c in (*self.values, *self.units) if c not in COLUMN_BY_NAME}
        if unknown:
            raise ValueError(f"not canonical columns: {sorted(unknown)}")
        return self


def load_mapping(path: str | Path) -> ColumnMapping:
    return load_config(ColumnMapping, path)


def bundled_mapping(name: Literal["adnimerge", "aibl"]) -> ColumnMapping:
    return load_mapping(MAPPINGS_DIR / f"{name}.yaml")
