"""A cohort CSV with bad parts: each case names the file, the line and the problem, keeps
every good row of the same file, and refuses the whole file only when no row can be read.

Each case is an ADNIMERGE-shaped file of a header, one good visit (line 2), the case's
line(s), and another good visit after them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from radiag.cohort.readers import read_adnimerge
from radiag.cohort.validate import CohortReadError

pytestmark = pytest.mark.reliability

HEADER = "RID,PTID,VISCODE,EXAMDATE,DX_bl,DX,AGE,PTGENDER,PTEDUCAT,MMSE,APOE4\n"
LINE_3 = "3,011_S_0003,bl,2005-09-12,MCI,MCI,81.3,Male,18,26,1"
GOOD = "2,011_S_0002,bl,2005-09-08,CN,CN,74.3,Male,16,28,0\n"
AFTER = "4,011_S_0004,bl,2005-10-01,AD,AD,77.0,Female,12,21,1\n"


def visit(**fields: str) -> str:
    """Line 3's visit (RID 3), with `fields` replacing its values."""
    values = dict(zip(HEADER.strip().split(","), LINE_3.split(","), strict=True)) | fields
    return ",".join(values.values()) + "\n"


QUARANTINED = {  # case: (bytes of the file, line, column, reason)
    "a word for a number": (visit(MMSE="abc"), 3, "MMSE", "not a number"),
    "out of range": (visit(MMSE="45"), 3, "MMSE", "out of range [0, 30]"),
    "an age of 7": (visit(AGE="7"), 3, "AGE", "out of range [40, 110]"),
    "an impossible date": (visit(EXAMDATE="2005-02-30"), 3, "EXAMDATE", "not a date"),
    "no visit code": (visit(VISCODE=""), 3, "VISCODE", "missing visit code (VISCODE)"),
    "an unknown sex": (visit(PTGENDER="X"), 3, "PTGENDER", "not one of Male, Female"),
    "the same visit twice": (GOOD, 3, "VISCODE", "duplicate visit"),
    "a field too many": (visit().strip() + ",EXTRA\n", 3, "(line)", "expected 11 fields, saw 12"),
    "fields missing": ("3,011_S_0003,bl\n", 3, "(line)", "expected 11 fields, saw 3"),
    "a NUL byte in a cell": (visit(PTGENDER="Ma\0le"), 3, "PTGENDER", "not one of Male, Female"),
    "a huge cell": (visit(PTGENDER="M" * 1_000_000), 3, "PTGENDER", "not one of Male, Female"),
}


def write(tmp_path: Path, body: str | bytes, encoding: str = "utf-8") -> Path:
    path = tmp_path / "ADNIMERGE.csv"
    path.write_bytes(body if isinstance(body, bytes) else body.encode(encoding))
    return path


@pytest.mark.parametrize(("line", "row", "column", "reason"), QUARANTINED.values(), ids=QUARANTINED)
def test_a_bad_line_is_quarantined_by_line_column_and_reason_and_the_rest_kept(
    tmp_path: Path, line: str, row: int, column: str, reason: str
) -> None:
    path = write(tmp_path, HEADER + GOOD + line + AFTER)
    ingested = read_adnimerge(path)
    assert sorted(ingested.cohort["RID"].to_pylist()) == [2, 4]  # both good visits kept
    problems = ingested.quarantine
    assert (problems["file"] == str(path)).all()
    found = problems[(problems["row"] == row) & (problems["column"] == column)]
    assert found["reason"].str.contains(re.escape(reason)).any(), problems.to_dict("records")


def test_a_cell_that_is_not_utf8_is_quarantined_and_the_rest_of_the_file_kept(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, HEADER + GOOD + visit(PTGENDER="Mäle") + AFTER, encoding="latin-1")
    ingested = read_adnimerge(path)
    assert sorted(ingested.cohort["RID"].to_pylist()) == [2, 4]
    reasons = ingested.quarantine.query("row == 3 and column == 'PTGENDER'")["reason"]
    assert "not UTF-8 text (save the file as UTF-8)" in set(reasons)


@pytest.mark.parametrize(
    ("transform", "name"),
    [
        (lambda text: text.replace(",", ";"), "semicolons"),
        (lambda text: text.replace(",", "\t"), "tabs"),
        (lambda text: text.replace("\n", "\r\n"), "CRLF line ends"),
        (lambda text: "\ufeff" + text, "a UTF-8 byte order mark"),
        (lambda text: text.replace("011_S_0004", '"011_S\n_0004"'), "a quoted newline"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_what_exports_vary_in_is_read_as_the_same_visits(tmp_path: Path, transform, name) -> None:
    ingested = read_adnimerge(write(tmp_path, transform(HEADER + GOOD + visit() + AFTER)))
    assert sorted(ingested.cohort["RID"].to_pylist()) == [2, 3, 4], name
    assert ingested.quarantine.empty, name


def test_a_utf16_export_with_its_byte_order_mark_is_read(tmp_path: Path) -> None:
    ingested = read_adnimerge(write(tmp_path, HEADER + GOOD + AFTER, encoding="utf-16"))
    assert sorted(ingested.cohort["RID"].to_pylist()) == [2, 4]


def test_thousands_of_columns_are_read(tmp_path: Path) -> None:
    extra = [f"X{i}" for i in range(3000)]
    header = HEADER.strip() + "," + ",".join(extra) + "\n"
    line = GOOD.strip() + "," + ",".join("1" for _ in extra) + "\n"
    assert read_adnimerge(write(tmp_path, header + line)).cohort.num_rows == 1


REFUSED = {  # case: (bytes of the file, the one line of the error after the path)
    "empty": (b"", "not a readable CSV"),
    "a header only": (HEADER.encode(), "no data rows, only a header"),
    "no RID column": (b"PTID,VISCODE\n011_S_0002,bl\n", "missing required column(s) RID"),
    "an image": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a readable CSV"),
    "every row bad": (
        (HEADER + visit(MMSE="abc")).encode(),
        "no visit kept, all 1 rows quarantined",
    ),
}


@pytest.mark.parametrize(("content", "message"), REFUSED.values(), ids=REFUSED)
def test_a_file_with_no_readable_row_is_refused_in_one_line_naming_it(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = write(tmp_path, content)
    with pytest.raises(CohortReadError) as refused:
        read_adnimerge(path)
    text = str(refused.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text.strip()
