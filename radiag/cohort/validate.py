"""Raw cohort rows -> the canonical cohort table, plus a quarantine of bad rows.

A bad row never stops ingestion: every problem becomes one quarantine record
(file, row number, column, value, reason) and the row is left out of the
cohort; every other row goes on. All checks are vectorised (1M rows in seconds).
Only an input that cannot give a cohort at all (a column the mapping needs is
absent, or no row survives) raises `CohortReadError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from radiag.cohort.mapping import COMPUTED_COLUMNS, ColumnMapping, Expression, LabelMap
from radiag.cohort.schema import (
    COHORT_SCHEMA,
    COLUMN_BY_NAME,
    COLUMNS,
    DX_BL_LABELS,
    DX_LABELS,
    NUMERIC_COLUMNS,
)
from radiag.errors import UserError

QUARANTINE_COLUMNS = ("file", "row", "RID", "VISCODE", "column", "value", "reason")
_VISCODE_MONTHS = re.compile(r"^m(\d+)$")
_PLAIN_NUMBER = r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$"  # ASCII digits (RE2's \d)
# A range check on a computed column is not repeated where one of its inputs failed its own.
_COMPUTED_FROM = {"age_at_visit": ("AGE", "Years_bl")}


class CohortReadError(UserError, RuntimeError):
    """A cohort file that cannot be read at all; the message is for the user."""


UNREADABLE_LINES = "unreadable_lines"
"""`DataFrame.attrs` key of the raw rows: file -> {line: reason} of lines that are no row."""
_NOT_UTF8 = "\ufffd"  # what the reader decodes a byte that is not UTF-8 to


@dataclass
class Problems:
    """Collects (row mask, column, reason) findings; one quarantine record per bad cell."""

    raw: pd.DataFrame
    records: list[pd.DataFrame] = field(default_factory=list)
    lines: list[pd.DataFrame] = field(default_factory=list)  # not rows: in no mask

    def add(
        self,
        mask: np.ndarray | pd.Series,
        column: str,
        reason: str,
        values: pd.Series | None = None,
    ) -> None:
        """Record `reason` for the rows in `mask`.

        Args:
            values: the values to show, where `column` is not a raw column as read
                (a computed or derived one, or a raw one the mapping renamed).
                Default: the raw cell of `column`.
        """
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return
        bad = self.raw.loc[mask]
        if values is not None:
            shown = values[mask]
        else:
            shown = bad[column] if column in bad else pd.Series("", index=bad.index)
        self.records.append(
            pd.DataFrame(
                {
                    "file": bad["_file"].astype(str),
                    "row": bad["_row"].astype("int64"),
                    "RID": bad.get("RID", pd.Series("", index=bad.index)).astype(str),
                    "VISCODE": bad.get("VISCODE", pd.Series("", index=bad.index)).astype(str),
                    "column": column,
                    "value": shown.astype(str),
                    "reason": reason,
                }
            )
        )

    def add_lines(self, file: str, reasons: dict[int, str]) -> None:
        """Lines of `file` that are no row at all (`reasons`: line number -> why)."""
        if reasons:
            self.lines.append(pd.DataFrame({
                "file": file, "row": list(reasons), "RID": "", "VISCODE": "",
                "column": "(line)", "value": "", "reason": list(reasons.values()),
            }).astype({"row": "int64"}))  # fmt: skip

    def table(self) -> pd.DataFrame:
        found = [*self.records, *self.lines]
        if not found:
            return pd.DataFrame({c: pd.Series(dtype=str) for c in QUARANTINE_COLUMNS}).astype(
                {"row": "int64"}
            )
        return pd.concat(found, ignore_index=True).sort_values(["file", "row"], kind="stable")

    def bad_rows(self) -> np.ndarray:
        bad = np.zeros(len(self.raw), dtype=bool)
        for record in self.records:
            bad[self.raw.index.get_indexer(record.index.unique())] = True
        return bad


@dataclass(frozen=True)
class IngestResult:
    cohort: pa.Table
    quarantine: pd.DataFrame

    def reasons(self) -> dict[str, int]:
        """Quarantine records per "column: reason", most frequent first: what the user reads
        first, so a reason such as "not a number" always says which column."""
        labelled = self.quarantine["column"] + ": " + self.quarantine["reason"]
        return {reason: int(n) for reason, n in labelled.value_counts().items()}


def _text(series: pd.Series, missing: set[str]) -> pd.Series:
    """Strip strings and turn missing tokens into NA (nullable string dtype)."""
    text = series.astype("string").str.strip()
    return text.mask(text.isin(missing))


def _as_numbers(text: pd.Series) -> pd.Series:
    """float64, NaN where not a number (plain NaN: nullable NA cannot be used as a mask).

    The values are `pd.to_numeric`'s, faster: plain decimals, nearly every cell, are cast
    by Arrow (correctly rounded, as pandas parses them; 0.03 s for 1M cells where
    `pd.to_numeric` takes 0.7 s); the other strings ("inf", "1,5") go to `pd.to_numeric`.
    """
    strings = pa.array(text)  # nullable strings (from `_text`)
    plain = pc.fill_null(pc.match_substring_regex(strings, _PLAIN_NUMBER), False)
    values = np.array(pc.cast(pc.if_else(plain, strings, None), pa.float64()), dtype="float64")
    if (np.signbit(values) & (values == 0)).any():
        # pandas reads "-0" as 0.0 in a column of integers, as -0.0 beside decimals
        return pd.to_numeric(text, errors="coerce").astype("float64")
    rest = text.notna().to_numpy() & ~plain.to_numpy(zero_copy_only=False)
    if rest.any():
        values[rest] = pd.to_numeric(text[rest], errors="coerce").astype("float64").to_numpy()
    return pd.Series(values, index=text.index)


def _numbers(text: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Parse numbers; censored strings (">1700", "<8") become their bound. Returns (values, unparsable)."""
    values = _as_numbers(text.str.lstrip("<>") if text.notna().any() else text)
    return values, text.notna() & values.isna()


def _matches(text: pd.Series, key: str | float) -> pd.Series:
    """Where a raw value equals a mapping key: text keys as written, number keys as numbers
    (so the YAML key `1` matches "1" and "1.0")."""
    if isinstance(key, str):
        return (text == key).fillna(False).astype(bool)
    return _as_numbers(text) == key


def _recode(text: pd.Series, recode: dict[str | float, str | float | None]) -> pd.Series:
    """Replace raw values by canonical ones ('' or None: not recorded); keys are matched
    against the original values, so {1: 2, 2: 3} does not chain."""
    out = text
    for key, value in recode.items():
        out = out.mask(_matches(text, key), pd.NA if value in (None, "") else str(value))
    return out


def _years_from_viscode(viscode: pd.Series) -> pd.Series:
    """Years since baseline from the visit code (bl -> 0, m06 -> 0.5), for exports without Years_bl."""
    months = viscode.str.extract(_VISCODE_MONTHS, expand=False).astype("float64")
    return months.where(viscode != "bl", 0.0) / 12.0


def _origin(raw: pd.DataFrame) -> str:
    return ", ".join(sorted(set(raw["_file"].astype(str)))) or "the input"


def _visit_codes(
    raw: pd.DataFrame, mapping: ColumnMapping, missing: set[str], problems: Problems
) -> tuple[pd.Series | None, pd.Series]:
    """VISCODE per row from the mapping's `visit` (None: the file's own VISCODE column),
    and the rows whose visit column the pattern did not match (quarantined here)."""
    unmatched = pd.Series(False, index=raw.index)
    if mapping.visit is None:
        return None, unmatched
    if isinstance(mapping.visit, str):
        return pd.Series(mapping.visit, index=raw.index, dtype="string"), unmatched
    column, pattern = mapping.visit.column, mapping.visit.pattern
    source = _text(raw[column], missing)
    grouped = pattern if re.compile(pattern).groups else f"({pattern})"
    codes = source.str.extract(grouped, expand=False)
    unmatched = source.notna() & codes.isna()
    problems.add(unmatched, column, f"no visit code: does not match '{pattern}'", raw[column])
    return codes, unmatched


def _derived(
    raw: pd.DataFrame, target: str, text: str, missing: set[str], problems: Problems
) -> pd.Series:
    """A derived column: the expression over the file's columns, parsed as numbers."""
    expression = Expression(text)
    absent = sorted(expression.names - set(raw.columns))
    if absent:
        raise CohortReadError(
            f"{_origin(raw)}: derived {target} = {text}: no column {', '.join(absent)} in the file"
        )
    operands = {}
    for name in sorted(expression.names):
        operands[name], unparsable = _numbers(_text(raw[name], missing))
        problems.add(unparsable, name, "not a number", raw[name])
    return pd.Series(expression.evaluate(operands), index=raw.index, dtype="float64")


def _subjects(
    ids: pd.Series, mapping: ColumnMapping, problems: Problems
) -> tuple[pd.Series, pd.Series]:
    """(RID as int64, the id as it appears in patient_id); -1 / "-1" where missing or bad."""
    problems.add(ids.isna(), "RID", "missing subject id (RID)")
    if mapping.subject_ids == "text":
        # Text ids are numbered in sort order: distinct ids never share a RID (splits are by RID).
        codes, _ = pd.factorize(ids, sort=True)
        rid = pd.Series(np.where(codes >= 0, codes + 1, -1), index=ids.index, dtype="int64")
        return rid, ids.fillna("-1")
    number = _as_numbers(ids)
    problems.add(
        ids.notna() & (number.isna() | (number % 1 != 0)),
        "RID",
        "RID is not an integer (for ids such as ABC_0001 set subject_ids: text)",
    )
    rid = number.where(number % 1 == 0).fillna(-1).astype("int64")
    return rid, rid.astype(str)


def _mapped_labels(values: pd.Series, labels: LabelMap) -> pd.Series:
    """LabelMap: thresholds first (the highest bound reached), then exact values over them."""
    number = _as_numbers(values)
    out = pd.Series(pd.NA, index=values.index, dtype="string")
    for bound, label in sorted(labels.at_least.items()):
        out = out.mask(number >= bound, str(label))
    for key, label in labels.map.items():
        out = out.mask(_matches(values, key), str(label))
    return out


def _labels(
    raw: pd.DataFrame, out: pd.DataFrame, mapping: ColumnMapping, missing: set[str]
) -> pd.Series:
    """CN / MCI / AD per row, NA where no usable label (the visit is kept, unlabeled)."""
    if mapping.label_column:
        # canonical names; anything else fails the label check and is quarantined
        return out["label"].str.upper()
    if isinstance(mapping.labels, LabelMap):
        column = mapping.labels.column  # a canonical column, or one of the file's own
        values = out[column] if column in out else raw.get(column)
        if values is None:
            return pd.Series(pd.NA, index=raw.index, dtype="string")
        return _mapped_labels(_text(values, missing), mapping.labels)
    # "MCI to Dementia": the diagnosis reached (vectorised in Arrow, unlike str.split)
    dx = out["DX"].str.upper().str.replace(r"(?s)^.* TO ", "", regex=True).str.strip()
    per_visit = dx.map({k: str(v) for k, v in DX_LABELS.items()}).astype("string")
    dx_bl = out["DX_bl"].str.upper().str.strip()
    at_baseline = dx_bl.map({k: str(v) for k, v in DX_BL_LABELS.items()}).astype("string")
    # DX_bl describes the baseline visit only; a later visit without DX stays unlabeled.
    return per_visit.fillna(at_baseline.where(out["VISCODE"] == "bl"))


def canonicalize(raw: pd.DataFrame, mapping: ColumnMapping) -> IngestResult:
    """Map, type, label and check raw rows; rows with any problem go to quarantine.

    Args:
        raw: rows as read from the file(s), all values as strings or numbers, plus
            `_file` and `_row` (the line number in that file) for error messages.
        mapping: how the raw columns map onto the canonical schema.

    Raises:
        CohortReadError: a derived column names a column the input lacks, or every
            row was quarantined (the message gives the commonest reasons).
    """
    frame = raw.rename(columns=mapping.columns)
    problems = Problems(frame)
    for file, reasons in raw.attrs.get(UNREADABLE_LINES, {}).items():
        problems.add_lines(file, reasons)
    for column in raw.columns.drop(["_file", "_row"], errors="ignore"):
        if pd.api.types.is_string_dtype(raw[column]):
            undecodable = raw[column].str.contains(_NOT_UTF8, regex=False, na=False)
            problems.add(undecodable, column, "not UTF-8 text (save the file as UTF-8)")
    missing = set(mapping.missing)
    visit, unmatched = _visit_codes(raw, mapping, missing, problems)
    if visit is not None:
        frame["VISCODE"] = visit
    absent = pd.Series(pd.NA, index=frame.index, dtype="string")
    text = {
        name: _recode(_text(frame[name], missing), mapping.values.get(name, {}))
        for name in COLUMN_BY_NAME
        if name in frame and name not in COMPUTED_COLUMNS
    }
    out = pd.DataFrame(index=frame.index)
    for name in ("RID", "VISCODE", "PTID", "DX", "DX_bl", "PTGENDER", "PTMARRY", "mri_path"):
        out[name] = text.get(name, absent)
    if mapping.label_column:
        out["label"] = text.get("label", absent)
    out["VISCODE"] = out["VISCODE"].str.lower()

    out["RID"], subject = _subjects(out["RID"], mapping, problems)
    if mapping.subject_ids == "text" and "PTID" not in text:
        out["PTID"] = subject.mask(out["RID"] < 0)
    problems.add(out["VISCODE"].isna() & ~unmatched, "VISCODE", "missing visit code (VISCODE)")

    for name in NUMERIC_COLUMNS:
        if name in mapping.derived:
            out[name] = _derived(raw, name, mapping.derived[name], missing, problems)
        elif name in text:
            values, unparsable = _numbers(text[name])
            problems.add(unparsable, name, "not a number")
            out[name] = values * mapping.units.get(name, 1.0)
        else:
            out[name] = np.nan

    exam_text = text.get("EXAMDATE", absent)
    dates = pd.to_datetime(exam_text, errors="coerce", format="mixed")
    problems.add(exam_text.notna() & dates.isna(), "EXAMDATE", "not a date")
    out["EXAMDATE"] = dates.dt.date

    out["Years_bl"] = out["Years_bl"].fillna(_years_from_viscode(out["VISCODE"].fillna("")))
    if mapping.age_at == "visit":
        out["AGE"] = out["AGE"] - out["Years_bl"].fillna(0)
    out["age_at_visit"] = out["AGE"] + out["Years_bl"].fillna(0)
    out["label"] = _labels(raw, out, mapping, missing)
    out["source"] = mapping.source
    out["patient_id"] = mapping.source + "-" + subject + "-" + out["VISCODE"].fillna("")

    _check_values(out, mapping, problems)
    duplicate = out["patient_id"].duplicated(keep="first") & out["RID"].ge(0)
    problems.add(
        duplicate, "VISCODE", "duplicate visit: this RID/VISCODE appears earlier in the input"
    )

    keep = ~problems.bad_rows()
    result = IngestResult(
        cohort=pa.Table.from_pandas(
            out.loc[keep, list(COHORT_SCHEMA.names)], schema=COHORT_SCHEMA, preserve_index=False
        ),
        quarantine=problems.table(),
    )
    if not keep.any():
        reasons = "; ".join(f"{reason} ({n})" for reason, n in list(result.reasons().items())[:3])
        found = f"all {len(raw)} rows quarantined: {reasons}" if len(raw) else "no rows"
        raise CohortReadError(f"{_origin(raw)}: no visit kept, {found}")
    return result


def _check_values(out: pd.DataFrame, mapping: ColumnMapping, problems: Problems) -> None:
    """Categories against their allowed values, numbers against the mapping's ranges."""
    out_of_range: dict[str, tuple[pd.Series, str]] = {}
    for column in COLUMNS:
        if column.allowed is not None:
            bad = out[column.name].notna() & ~out[column.name].isin(column.allowed)
            problems.add(bad, column.name, f"not one of {', '.join(column.allowed)}")
        if column.name in NUMERIC_COLUMNS and (bounds := mapping.bounds(column.name)):
            values = out[column.name]
            low, high = bounds
            out_of_range[column.name] = (values < low) | (values > high), f"[{low:g}, {high:g}]"
    for name, (bad, bounds) in out_of_range.items():
        for source in _COMPUTED_FROM.get(name, ()):
            bad = bad & ~out_of_range[source][0]
        # a value computed here has no raw cell to show
        shown = out[name] if name in mapping.derived or name in _COMPUTED_FROM else None
        problems.add(bad, name, f"out of range {bounds}", shown)
