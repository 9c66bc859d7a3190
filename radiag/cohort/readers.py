"""Readers for real cohort exports: ADNIMERGE, AIBL, and any CSV through a mapping.

Each reader returns raw rows (strings, plus `_file`/`_row` for error messages) and
hands them to `canonicalize` with the right mapping, so validation and quarantine
are the same for every source. A file that cannot be read at all, or from which
no row survives, raises `CohortReadError` with one clear message.
"""

from __future__ import annotations

import csv
import glob
import io
from pathlib import Path
from typing import IO

import pandas as pd

from radiag.cohort.mapping import ColumnMapping, bundled_mapping
from radiag.cohort.validate import UNREADABLE_LINES, CohortReadError, IngestResult, canonicalize
from radiag.store import filesystem_for

# AIBL exports are one CSV per instrument, named like aibl_mmse_01-Jun-2018.csv.
AIBL_TABLES = {
    "ptdemog": ("RID", "PTGENDER", "PTDOB"),
    "pdxconv": ("RID", "VISCODE", "DXCURREN"),
    "mmse": ("RID", "VISCODE", "EXAMDATE", "MMSCORE"),
    "cdr": ("RID", "VISCODE", "CDMEMORY", "CDORIENT", "CDJUDGE", "CDCOMMUN", "CDHOME", "CDCARE"),
    "apoeres": ("RID", "APGEN1", "APGEN2"),
}
CDR_BOXES = AIBL_TABLES["cdr"][2:]
DELIMITERS = ",;\t|"
ADNIMERGE_REQUIRED = ("RID", "VISCODE")  # read_adnimerge refuses a file without them
_SNIFF_CHARS = 16_384


def read_csv_rows(
    path: str | Path,
    required: tuple[str, ...] = (),
    content: IO[bytes] | None = None,
    delimiter: str | None = None,
) -> pd.DataFrame:
    """Read a CSV as strings, with `_file` and `_row` (1-based line number, header = line 1).

    Args:
        path: the file; also the name errors and quarantine records give.
        required: columns without which the file is refused.
        content: the file's bytes when they come from elsewhere (an s3:// run store).
        delimiter: the field separator. Default: detected from the first lines (one of
            `DELIMITERS`; a European export is often `;`-separated).

    Raises:
        CohortReadError: the file is missing, not a CSV, lacks a required column or
            has no data rows.
    """
    if content is None and str(path).startswith("s3://"):
        content = _s3_object(str(path))
    try:
        data = content.read() if content is not None else Path(path).read_bytes()
        text = _decoded(data, path)
        sep = delimiter or _detect_delimiter(text)
        rows = pd.read_csv(
            io.StringIO(text), sep=sep, dtype=str, keep_default_na=False,
            skipinitialspace=True, on_bad_lines="skip",
        )  # fmt: skip
    except FileNotFoundError:
        raise CohortReadError(f"{path}: file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise CohortReadError(f"{path}: not a readable CSV ({err})") from None
    absent = [c for c in required if c not in rows.columns]
    if absent:
        found = ", ".join(rows.columns[:8]) + (", ..." if len(rows.columns) > 8 else "")
        raise CohortReadError(
            f"{path}: missing required column(s) {', '.join(absent)} "
            f"(read with delimiter {sep!r}, columns: {found})"
        )
    # pandas skips a line with too many fields and pads one with too few (with "", as an
    # empty field): `csv` counts each line's fields, and both go to the quarantine.
    records = _records(text, sep)
    width = len(rows.columns)
    ragged = {line: f"expected {width} fields, saw {n}" for line, n in records if n != width}
    if rows.empty and not ragged:
        raise CohortReadError(f"{path}: no data rows, only a header")
    rows["_file"] = str(path)
    rows["_row"] = [line for line, n in records if n <= width]
    rows = rows.loc[~rows["_row"].isin(ragged)]
    rows.attrs[UNREADABLE_LINES] = {str(path): ragged}
    return rows


def _decoded(data: bytes, path: str | Path) -> str:
    """The file's text: UTF-8 (a BOM is dropped), or UTF-16 when it starts with its BOM.
    Bytes that are not UTF-8 become U+FFFD, so that only the cells holding them are
    quarantined (`canonicalize`), not the whole file."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as err:
            raise CohortReadError(
                f"{path}: not UTF-16 text after its byte order mark ({err})"
            ) from None
    text = data.decode("utf-8-sig", errors="replace")
    header = text.partition("\n")[0]
    if "\x00" in header or "\ufffd" in header:
        raise CohortReadError(f"{path}: not a readable CSV (its header line is not UTF-8 text)")
    return text


def _detect_delimiter(text: str) -> str:
    """The delimiter of the first lines; a comma when they do not tell (one column)."""
    head = text[:_SNIFF_CHARS]
    if len(text) > _SNIFF_CHARS and "\n" in head:
        head = head[: head.rindex("\n")]  # whole lines only
    try:
        return csv.Sniffer().sniff(head, delimiters=DELIMITERS).delimiter
    except csv.Error:
        return ","


def _records(text: str, sep: str) -> list[tuple[int, int]]:
    """(line it starts on, number of fields) of each data record, header = line 1: a
    quoted field may hold a newline, and blank lines are no record (as for pandas)."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # a huge cell is a cell
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, skipinitialspace=True)
    found, end = [], 0
    for record in reader:
        if len(record) > 1 or any(field.strip() for field in record):
            found.append((end + 1, len(record)))
        end = reader.line_num
    return found[1:]  # [0]: the header


def _s3_object(uri: str) -> IO[bytes]:
    """An export kept in object storage (the run store's S3 settings apply)."""
    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_stream(path, compression=None) as stream:
            return io.BytesIO(stream.read())
    except OSError as err:  # FileNotFoundError included
        raise CohortReadError(f"{uri}: cannot be read ({err})") from None


def read_adnimerge(path: str | Path) -> IngestResult:
    """ADNIMERGE.csv (ADNI's merged table, one row per visit)."""
    return canonicalize(
        read_csv_rows(path, required=ADNIMERGE_REQUIRED), bundled_mapping("adnimerge")
    )


def read_mapped_csv(path: str | Path, mapping: ColumnMapping) -> IngestResult:
    """Any cohort CSV whose columns a mapping YAML translates."""
    rows = read_csv_rows(
        path, required=tuple(mapping.required_columns()), delimiter=mapping.delimiter
    )
    return canonicalize(rows, mapping)


def _aibl_file(directory: Path, table: str) -> Path:
    matches = sorted(glob.glob(str(directory / f"aibl_{table}*.csv")))
    if not matches:
        raise CohortReadError(f"{directory}: no aibl_{table}*.csv export found")
    return Path(matches[-1])  # the newest export date sorts last within one naming scheme


def read_aibl(directory: str | Path) -> IngestResult:
    """AIBL exports: per-instrument CSVs joined on RID/VISCODE.

    Demographics and APOE genotype are per subject; age at the visit comes from the
    year of birth (PTDOB, "/1931") and the visit's EXAMDATE; CDR-SB is the sum of
    the six CDR boxes; APOE4 counts e4 alleles in APGEN1/APGEN2.
    """
    directory = Path(directory)
    tables = {
        name: read_csv_rows(_aibl_file(directory, name), required=columns)[
            [*columns, "_file", "_row"]
        ]
        for name, columns in AIBL_TABLES.items()
    }
    visits = tables["pdxconv"]  # one row per diagnosed visit; its file/row name errors
    for name in ("mmse", "cdr"):
        extra = tables[name].drop(columns=["_file", "_row"]).drop_duplicates(["RID", "VISCODE"])
        visits = visits.merge(extra, on=["RID", "VISCODE"], how="left")
    subjects = tables["ptdemog"].drop(columns=["_file", "_row"]).drop_duplicates("RID")
    genotype = tables["apoeres"].drop(columns=["_file", "_row"]).drop_duplicates("RID")
    visits = visits.merge(subjects, on="RID", how="left").merge(genotype, on="RID", how="left")

    birth_year = pd.to_numeric(
        visits["PTDOB"].str.extract(r"(\d{4})", expand=False), errors="coerce"
    )
    exam_year = pd.to_datetime(visits["EXAMDATE"], errors="coerce").dt.year
    visits["AGE"] = (exam_year - birth_year).astype("Float64").astype(str).replace("<NA>", "")
    boxes = visits[list(CDR_BOXES)].apply(pd.to_numeric, errors="coerce")
    visits["CDRSB"] = boxes.where(boxes >= 0).sum(axis=1, min_count=len(CDR_BOXES)).astype(str)
    alleles = visits[["APGEN1", "APGEN2"]].apply(pd.to_numeric, errors="coerce")
    visits["APOE4"] = (alleles == 4).sum(axis=1).where(alleles.gt(0).all(axis=1)).astype(str)
    return canonicalize(visits.replace({"nan": ""}), bundled_mapping("aibl"))
