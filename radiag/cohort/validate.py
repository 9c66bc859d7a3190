"""Raw cohort rows -> the canonical cohort table, plus a quarantine of bad rows.

A bad row never stops ingestion: every problem becomes one quarantine record
(file, row number, column, value, reason) and the row is left out of the
cohort; every other row goes on. All checks are vectorised (1M rows in seconds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from radiag.cohort.mapping import ColumnMapping, LabelMap
from radiag.cohort.schema import (
    COHORT_SCHEMA,
    COLUMNS,
    DX_BL_LABELS,
    DX_LABELS,
    NUMERIC_COLUMNS,
)

QUARANTINE_COLUMNS = ("file", "row", "RID", "VISCODE", "column", "value", "reason")
_VISCODE_MONTHS = re.compile(r"^m(\d+)$")


@dataclass
class Problems:
    """Collects (row mask, column, reason) findings; one quarantine record per bad cell."""

    raw: pd.DataFrame
    records: list[pd.DataFrame] = field(default_factory=list)

    def add(self, mask: np.ndarray | pd.Series, column: str, reason: str) -> None:
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return
        bad = self.raw.loc[mask]
        values = bad[column] if column in bad else pd.Series("", index=bad.index)
        self.records.append(
            pd.DataFrame(
                {
                    "file": bad["_file"].astype(str),
                    "row": bad["_row"].astype("int64"),
                    "RID": bad.get("RID", pd.Series("", index=bad.index)).astype(str),
                    "VISCODE": bad.get("VISCODE", pd.Series("", index=bad.index)).astype(str),
                    "column": column,
                    "value": values.astype(str),
                    "reason": reason,
                }
            )
        )

    def table(self) -> pd.DataFrame:
        if not self.records:
            return pd.DataFrame({c: pd.Series(dtype=str) for c in QUARANTINE_COLUMNS}).astype(
                {"row": "int64"}
            )
        return pd.concat(self.records, ignore_index=True).sort_values(
            ["file", "row"], kind="stable"
        )

    def bad_rows(self) -> np.ndarray:
        bad = np.zeros(len(self.raw), dtype=bool)
        for record in self.records:
            bad[self.raw.index.get_indexer(record.index.unique())] = True
        return bad


@dataclass(frozen=True)
class IngestResult:
    cohort: pa.Table
    quarantine: pd.DataFrame


def _text(series: pd.Series, missing: set[str]) -> pd.Series:
    """Strip strings and turn missing tokens into NA (nullable string dtype)."""
    text = series.astype("string").str.strip()
    return text.mask(text.isin(missing))


def _numbers(text: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Parse numbers; censored strings (">1700", "<8") become their bound. Returns (values, unparsable)."""
    stripped = text.str.lstrip("<>") if text.notna().any() else text
    values = pd.to_numeric(stripped, errors="coerce").astype("float64")
    return values, text.notna() & values.isna()


def _years_from_viscode(viscode: pd.Series) -> pd.Series:
    """Years since baseline from the visit code (bl -> 0, m06 -> 0.5), for exports without Years_bl."""
    months = viscode.str.extract(_VISCODE_MONTHS, expand=False).astype("float64")
    return months.where(viscode != "bl", 0.0) / 12.0


def _labels(frame: pd.DataFrame, mapping: ColumnMapping) -> pd.Series:
    """CN / MCI / AD per row, NA where no usable label (the visit is kept, unlabeled)."""
    if isinstance(mapping.labels, LabelMap):
        raw = frame.get(mapping.labels.column, pd.Series(pd.NA, index=frame.index, dtype="string"))
        codes = {key: str(label) for key, label in mapping.labels.map.items()}
        return raw.astype("string").str.strip().map(codes).astype("string")
    na = pd.Series(pd.NA, index=frame.index, dtype="string")
    dx = frame.get("DX", na).str.upper().str.split(" TO ").str[-1].str.strip()
    per_visit = dx.map({k: str(v) for k, v in DX_LABELS.items()}).astype("string")
    dx_bl = frame.get("DX_bl", na).str.upper().str.strip()
    at_baseline = dx_bl.map({k: str(v) for k, v in DX_BL_LABELS.items()}).astype("string")
    # DX_bl describes the baseline visit only; a later visit without DX stays unlabeled.
    return per_visit.fillna(at_baseline.where(frame["VISCODE"] == "bl"))


def canonicalize(raw: pd.DataFrame, mapping: ColumnMapping) -> IngestResult:
    """Map, type, label and check raw rows; rows with any problem go to quarantine.

    Args:
        raw: rows as read from the file(s), all values as strings or numbers, plus
            `_file` and `_row` (the line number in that file) for error messages.
        mapping: how the raw columns map onto the canonical schema.
    """
    frame = raw.rename(columns=mapping.columns)
    problems = Problems(frame)
    missing = set(mapping.missing)
    out = pd.DataFrame(index=frame.index)

    for name in ("RID", "VISCODE", "PTID", "DX", "DX_bl", "PTGENDER", "PTMARRY", "mri_path"):
        absent = pd.Series(pd.NA, index=frame.index, dtype="string")
        out[name] = _text(frame[name], missing) if name in frame else absent
    for column, recode in mapping.values.items():
        out[column] = out[column].replace(recode)
        out[column] = out[column].mask(out[column] == "")
    out["VISCODE"] = out["VISCODE"].str.lower()

    rid = pd.to_numeric(out["RID"], errors="coerce")
    problems.add(out["RID"].isna(), "RID", "missing subject id (RID)")
    problems.add(out["RID"].notna() & (rid.isna() | (rid % 1 != 0)), "RID", "RID is not an integer")
    problems.add(out["VISCODE"].isna(), "VISCODE", "missing visit code (VISCODE)")
    out["RID"] = rid.fillna(-1).astype("int64")

    for name in NUMERIC_COLUMNS:
        if name not in frame:
            out[name] = np.nan
            continue
        values, unparsable = _numbers(_text(frame[name], missing))
        problems.add(unparsable, name, "not a number")
        out[name] = values * mapping.units.get(name, 1.0)

    exam_text = _text(frame.get("EXAMDATE", absent), missing)
    dates = pd.to_datetime(exam_text, errors="coerce", format="mixed")
    problems.add(exam_text.notna() & dates.isna(), "EXAMDATE", "not a date")
    out["EXAMDATE"] = dates.dt.date

    out["Years_bl"] = out["Years_bl"].fillna(_years_from_viscode(out["VISCODE"].fillna("")))
    if mapping.age_at == "visit":
        out["AGE"] = out["AGE"] - out["Years_bl"].fillna(0)
    out["age_at_visit"] = out["AGE"] + out["Years_bl"].fillna(0)
    out["label"] = _labels(
        pd.concat([frame.drop(columns=out.columns, errors="ignore"), out], axis=1), mapping
    )
    out["source"] = mapping.source
    out["patient_id"] = (
        mapping.source + "-" + out["RID"].astype(str) + "-" + out["VISCODE"].fillna("")
    )

    for column in COLUMNS:
        if column.allowed is not None:
            bad = out[column.name].notna() & ~out[column.name].isin(column.allowed)
            problems.add(bad, column.name, f"not one of {', '.join(column.allowed)}")
        if column.low is not None and column.name in NUMERIC_COLUMNS:
            values = out[column.name]
            problems.add(
                (values < column.low) | (values > column.high),
                column.name,
                f"out of range [{column.low:g}, {column.high:g}]",
            )
    duplicate = out["patient_id"].duplicated(keep="first") & out["RID"].ge(0)
    problems.add(
        duplicate, "VISCODE", "duplicate visit: this RID/VISCODE appears earlier in the input"
    )

    keep = ~problems.bad_rows()
    cohort = pa.Table.from_pandas(
        out.loc[keep, list(COHORT_SCHEMA.names)], schema=COHORT_SCHEMA, preserve_index=False
    )
    return IngestResult(cohort=cohort, quarantine=problems.table())
