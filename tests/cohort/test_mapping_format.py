"""The mapping format on exports written the way other cohorts' files look.

Each test writes a small CSV and its mapping YAML into tmp_path and ingests them as
a user would (`read_mapped_csv(path, load_mapping(yaml))`); YAML numbers are left
unquoted on purpose.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from radiag.cli import app
from radiag.cohort.mapping import ColumnMapping, Expression, LabelMap, VisitFrom, load_mapping
from radiag.cohort.readers import CohortReadError, read_mapped_csv
from radiag.cohort.validate import IngestResult
from radiag.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def ingest(tmp_path: Path, csv: str, mapping: str) -> IngestResult:
    path = tmp_path / "export.csv"
    path.write_text(textwrap.dedent(csv).lstrip())
    yaml = tmp_path / "mapping.yaml"
    yaml.write_text(textwrap.dedent(mapping))
    return read_mapped_csv(path, load_mapping(yaml))


def cohort(result: IngestResult) -> pd.DataFrame:
    return result.cohort.to_pandas().set_index("patient_id")


def found(result: IngestResult) -> list[tuple[int, str, str, str]]:
    """(line, column, value, reason) of every quarantine record."""
    columns = ["row", "column", "value", "reason"]
    return [tuple(r) for r in result.quarantine[columns].itertuples(index=False)]


# --- subject ids -------------------------------------------------------------


def test_text_subject_ids_stay_readable_in_patient_id_and_ptid(tmp_path: Path) -> None:
    result = ingest(
        tmp_path,
        """
        subject,VISCODE,MMSE
        ABC_0002,bl,28
        ABC_0001,bl,27
        ABC_0001,m12,25
        """,
        """
        source: oasis
        subject_ids: text
        columns: {subject: RID}
        """,
    )
    table = cohort(result)
    assert sorted(table.index) == ["oasis-ABC_0001-bl", "oasis-ABC_0001-m12", "oasis-ABC_0002-bl"]
    assert table.loc["oasis-ABC_0002-bl", "PTID"] == "ABC_0002"
    rid = table["RID"]
    assert rid["oasis-ABC_0001-bl"] == rid["oasis-ABC_0001-m12"]  # one subject, one RID
    assert rid["oasis-ABC_0001-bl"] != rid["oasis-ABC_0002-bl"]  # splits keep them apart
    assert result.quarantine.empty


def test_integer_subject_ids_quarantine_a_text_id_and_say_how_to_allow_it(tmp_path: Path) -> None:
    result = ingest(tmp_path, "RID,VISCODE\n7,bl\nABC_0001,bl\n", "source: clinic\n")
    assert list(cohort(result).index) == ["clinic-7-bl"]
    ((line, column, value, reason),) = found(result)
    assert (line, column, value) == (3, "RID", "ABC_0001")
    assert "subject_ids: text" in reason


# --- derived columns ----------------------------------------------------------


def test_a_derived_column_is_computed_from_the_files_own_columns(tmp_path: Path) -> None:
    result = ingest(
        tmp_path,
        """
        RID,VISCODE,nWBV,eTIV_cm3,Left-Hippocampus,Right-Hippocampus
        1,bl,0.75,1500,3.5,3.4
        2,bl,0.70,1400,NA,3.0
        """,
        """
        source: oasis
        derived:
          WholeBrain: nWBV * eTIV_cm3 * 1000
          ICV: -(-eTIV_cm3) * (1000 / 1)
          Hippocampus: (`Left-Hippocampus` + `Right-Hippocampus`) * 1000
        """,
    )
    table = cohort(result)
    assert table.loc["oasis-1-bl", "WholeBrain"] == pytest.approx(0.75 * 1500 * 1000)
    assert table.loc["oasis-1-bl", "ICV"] == pytest.approx(1_500_000)
    assert table.loc["oasis-1-bl", "Hippocampus"] == pytest.approx(6900)
    assert pd.isna(table.loc["oasis-2-bl", "Hippocampus"])  # an operand not recorded


def test_a_derived_column_naming_an_absent_column_is_refused_with_that_name(
    tmp_path: Path,
) -> None:
    with pytest.raises(CohortReadError, match=r"derived WholeBrain .*no column brain_fraction"):
        ingest(
            tmp_path,
            "RID,VISCODE,nWBV,eTIV\n1,bl,0.7,1500\n",
            "source: oasis\nderived: {WholeBrain: brain_fraction * eTIV}\n",
        )


def test_a_derived_operand_that_is_not_a_number_quarantines_its_row_by_raw_column(
    tmp_path: Path,
) -> None:
    result = ingest(
        tmp_path,
        "RID,VISCODE,nWBV,eTIV\n1,bl,0.75,1500\n2,bl,0.7x,1500\n",
        "source: oasis\nderived: {WholeBrain: nWBV * eTIV * 1000}\n",
    )
    assert list(cohort(result).index) == ["oasis-1-bl"]
    assert found(result) == [(3, "nWBV", "0.7x", "not a number")]


def test_a_derived_value_out_of_range_is_shown_as_computed(tmp_path: Path) -> None:
    result = ingest(
        tmp_path,
        "RID,VISCODE,nWBV,eTIV\n1,bl,0.75,1500\n2,bl,0.75,15\n",
        "source: oasis\nderived: {WholeBrain: nWBV * eTIV * 1000}\n",
    )
    ((line, column, value, reason),) = found(result)
    assert (line, column, float(value)) == (3, "WholeBrain", pytest.approx(11_250))
    assert reason.startswith("out of range")


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('true')",  # a call
        "nWBV.real",  # an attribute
        "nWBV ** 2",  # only + - * /
        "nWBV if eTIV else 0",
        "nWBV < eTIV",
        "eTIV[0]",
        "'1000'",  # text is not a number
        "True",
        "lambda: 1",
        "nWBV *",  # not an expression at all
    ],
)
def test_an_expression_is_only_arithmetic_and_is_refused_when_the_mapping_loads(
    text: str,
) -> None:
    with pytest.raises(ValueError):
        Expression(text)
    with pytest.raises(ValidationError, match="derived"):
        ColumnMapping(source="x", derived={"WholeBrain": text})


def test_an_expression_evaluates_numbers_names_operators_and_parentheses() -> None:
    a, b = pd.Series([1.0, 4.0]), pd.Series([2.0, 8.0])
    value = Expression("(a + b) / 2 - -a * 3").evaluate({"a": a, "b": b})
    assert list(value) == [4.5, 18.0]
    assert Expression("(a + b) / 2 - -a * 3").names == {"a", "b"}


# --- labels from a numeric rating -----------------------------------------------


def test_labels_come_from_a_numeric_rating_by_value_and_threshold(tmp_path: Path) -> None:
    result = ingest(
        tmp_path,
        """
        RID,VISCODE,cdr
        1,bl,0
        2,bl,0.5
        3,bl,0.50
        4,bl,1
        5,bl,2
        6,bl,0.25
        7,bl,
        """,
        """
        source: oasis
        labels:
          column: cdr
          map: {0: CN, 0.5: MCI}
          at_least: {1: AD}
        """,
    )
    labels = cohort(result)["label"]
    assert labels.tolist()[:5] == ["CN", "MCI", "MCI", "AD", "AD"]
    assert pd.isna(labels["oasis-6-bl"]) and pd.isna(labels["oasis-7-bl"])  # in no map: unlabeled


def test_thresholds_alone_label_every_rating_by_the_highest_bound_reached(tmp_path: Path) -> None:
    result = ingest(
        tmp_path,
        "RID,VISCODE,cdr\n1,bl,0\n2,bl,0.25\n3,bl,0.5\n4,bl,3\n",
        "source: oasis\nlabels: {column: cdr, at_least: {0: CN, 0.5: MCI, 1: AD}}\n",
    )
    assert cohort(result)["label"].tolist() == ["CN", "CN", "MCI", "AD"]


def test_quoted_label_keys_match_as_written_and_unquoted_ones_as_numbers(tmp_path: Path) -> None:
    result = ingest(
        tmp_path,
        "RID,VISCODE,DXCURREN\n1,bl,1\n2,bl,1.0\n3,bl,2.0\n",
        """
        source: aibl
        labels: {column: DXCURREN, map: {"1": CN, 2: MCI}}
        """,
    )
    labels = cohort(result)["label"]
    assert labels["aibl-1-bl"] == "CN" and pd.isna(labels["aibl-2-bl"])  # "1" is not "1.0"
    assert labels["aibl-3-bl"] == "MCI"  # 2 is 2.0


# --- visit codes --------------------------------------------------------------


def test_a_constant_visit_code_stands_in_for_a_missing_visit_column(tmp_path: Path) -> None:
    result = ingest(tmp_path, "RID,MMSE\n1,29\n2,27\n", "source: oasis\nvisit: bl\n")
    assert sorted(cohort(result).index) == ["oasis-1-bl", "oasis-2-bl"]


def test_a_visit_code_is_taken_from_another_column_by_a_pattern(tmp_path: Path) -> None:
    result = ingest(
        tmp_path,
        """
        RID,session
        1,OAS2_0001_MR1
        1,OAS2_0001_MR2
        2,OAS2_0002_MR1
        3,OAS2_0003_CT
        """,
        r"""
        source: oasis
        visit: {column: session, pattern: 'MR(\d+)$'}
        values:
          VISCODE: {1: bl, 2: m12}
        """,
    )
    assert sorted(cohort(result).index) == ["oasis-1-bl", "oasis-1-m12", "oasis-2-bl"]
    # one reason, on the column that did not match (not also "missing visit code")
    assert found(result) == [
        (5, "session", "OAS2_0003_CT", r"no visit code: does not match 'MR(\d+)$'")
    ]


def test_a_visit_code_comes_from_one_place_only() -> None:
    with pytest.raises(ValidationError, match="not both"):
        ColumnMapping(source="x", visit="bl", columns={"visit": "VISCODE"})
    with pytest.raises(ValidationError, match="one group"):
        VisitFrom(column="session", pattern=r"(MR)(\d+)")


# --- value recoding on numeric columns --------------------------------------------


def test_a_numeric_column_is_recoded_by_numeric_keys(tmp_path: Path) -> None:
    result = ingest(
        tmp_path,
        "RID,VISCODE,educ\n1,bl,1\n2,bl,3\n3,bl,4.0\n4,bl,9\n",
        """
        source: oasis
        columns: {educ: PTEDUCAT}
        values:
          PTEDUCAT: {1: 6, 2: 9, 3: 12, 4: 16, 9: null}   # level code -> years; 9 = unknown
        """,
    )
    years = cohort(result)["PTEDUCAT"]
    assert years.tolist()[:3] == [6, 12, 16] and pd.isna(years["oasis-4-bl"])


def test_a_numeric_column_recoded_to_text_is_refused_when_the_mapping_loads() -> None:
    with pytest.raises(ValidationError, match=r"values\.PTEDUCAT: recodes to numbers"):
        ColumnMapping(source="x", values={"PTEDUCAT": {1: "primary"}})


# --- a raw label column -----------------------------------------------------------


def test_a_column_mapped_to_label_gives_the_labels(tmp_path: Path) -> None:
    result = ingest(
        tmp_path,
        "RID,VISCODE,dx\n1,bl,CN\n2,bl,mci\n3,bl,Dementia\n4,bl,\n5,bl,Unsure\n",
        "source: clinic\ncolumns: {dx: label}\nvalues:\n  label: {Dementia: AD}\n",
    )
    labels = cohort(result)["label"]
    assert labels.tolist()[:3] == ["CN", "MCI", "AD"] and pd.isna(labels["clinic-4-bl"])
    assert found(result) == [(6, "label", "Unsure", "not one of AD, MCI, CN")]


def test_a_label_column_and_a_label_map_together_are_refused() -> None:
    with pytest.raises(ValidationError, match="not both"):
        ColumnMapping(
            source="x", columns={"dx": "label"}, labels={"column": "dx", "map": {1: "AD"}}
        )


def test_a_mapped_label_column_absent_from_the_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CohortReadError, match=r"missing required column\(s\) dx"):
        ingest(tmp_path, "RID,VISCODE,diagnosis\n1,bl,CN\n", "source: x\ncolumns: {dx: label}\n")


# --- delimiter ------------------------------------------------------------------


@pytest.mark.parametrize("sep", [";", "\t", "|"])
def test_the_delimiter_is_detected(tmp_path: Path, sep: str) -> None:
    csv = sep.join(["RID", "VISCODE", "MMSE"]) + "\n" + sep.join(["1", "bl", "28"]) + "\n"
    result = ingest(tmp_path, csv, "source: x\n")
    assert cohort(result).loc["x-1-bl", "MMSE"] == 28


def test_an_unusual_delimiter_is_set_in_the_mapping(tmp_path: Path) -> None:
    csv = "RID:VISCODE:MMSE\n1:bl:28\n"
    with pytest.raises(CohortReadError, match=r"missing required column.*delimiter ','"):
        ingest(tmp_path, csv, "source: x\n")
    result = ingest(tmp_path, csv, "source: x\ndelimiter: ':'\n")
    assert cohort(result).loc["x-1-bl", "MMSE"] == 28


# --- quarantine line numbers and reasons -----------------------------------------


def test_quarantine_lines_are_source_lines_after_a_quoted_newline_and_a_blank_line(
    tmp_path: Path,
) -> None:
    csv = 'RID,VISCODE,PTMARRY,MMSE\n1,bl,"Married\nsince 1970",28\n\n2,bl,Married,31\n3,bl,,29\n4,bl,,99\n'
    mapping = 'source: x\nvalues: {PTMARRY: {"Married\\nsince 1970": Married}}\n'
    result = ingest(tmp_path, csv, mapping)
    lines = csv.splitlines()
    assert [row for row, *_ in found(result)] == [
        lines.index("2,bl,Married,31") + 1,
        lines.index("4,bl,,99") + 1,
    ]
    assert cohort(result).loc["x-1-bl", "PTMARRY"] == "Married"


def test_each_reason_names_its_column(tmp_path: Path) -> None:
    result = ingest(
        tmp_path, "RID,VISCODE,MMSE,CDRSB\n1,bl,x,1\n2,bl,28,y\n3,bl,29,2\n", "source: x\n"
    )
    assert result.reasons() == {"MMSE: not a number": 1, "CDRSB: not a number": 1}


def test_an_age_out_of_range_is_one_reason_not_repeated_by_the_age_at_visit_check(
    tmp_path: Path,
) -> None:
    result = ingest(
        tmp_path,
        "RID,VISCODE,AGE,Years_bl\n1,bl,70,0\n2,bl,35,0\n3,m240,105,20\n",
        "source: x\n",
    )
    assert found(result) == [
        (3, "AGE", "35", "out of range [40, 110]"),
        (4, "age_at_visit", "125.0", "out of range [40, 120]"),  # the computed value, not ""
    ]


def test_the_console_lists_each_quarantine_reason_with_its_column(tmp_path: Path) -> None:
    csv = tmp_path / "export.csv"
    csv.write_text("RID,VISCODE,MMSE\n1,bl,28\n2,bl,x\n3,bl,31\n")
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("source: x\n")
    result = CliRunner().invoke(app, ingest_args(tmp_path, csv, mapping))
    assert result.exit_code == 0, result.output
    assert re.search(r"^\s+1\s+MMSE: not a number$", result.output, re.M)
    assert re.search(r"^\s+1\s+MMSE: out of range \[0, 30\]$", result.output, re.M)


def ingest_args(tmp_path: Path, csv: Path, mapping: Path) -> list[str]:
    return ["cohort", "ingest", "--set", f"run_dir={tmp_path / 'run'}",
            "--set", "cohort.source=csv", "--set", f"cohort.path={csv}",
            "--set", f"cohort.mapping={mapping}"]  # fmt: skip


# --- an ingest that keeps nothing -----------------------------------------------


def test_a_header_only_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CohortReadError, match="no data rows"):
        ingest(tmp_path, "RID,VISCODE,MMSE\n", "source: x\n")


def test_an_ingest_that_quarantines_every_row_fails_with_the_reasons(tmp_path: Path) -> None:
    with pytest.raises(CohortReadError, match=r"no visit kept, all 2 rows quarantined: AGE: out"):
        ingest(tmp_path, "RID,VISCODE,AGE\n1,bl,12\n2,bl,15\n", "source: x\n")


def test_the_cli_exits_non_zero_with_one_line_when_no_row_is_kept(tmp_path: Path) -> None:
    csv = tmp_path / "export.csv"
    csv.write_text("RID,VISCODE,AGE\n1,bl,12\n")
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("source: x\n")
    result = CliRunner().invoke(app, ingest_args(tmp_path, csv, mapping))
    assert result.exit_code == 2
    assert "no visit kept" in result.output and "Traceback" not in result.output


# --- ranges ---------------------------------------------------------------------


def test_age_bounds_are_set_per_cohort_and_age_at_visit_follows(tmp_path: Path) -> None:
    csv = "RID,VISCODE,AGE,Years_bl\n1,bl,30,0\n1,m12,30,1\n2,bl,70,0\n"
    assert list(cohort(ingest(tmp_path, csv, "source: x\n")).index) == ["x-2-bl"]  # default
    wider = ingest(tmp_path, csv, "source: x\nranges: {AGE: [18, 110]}\n")
    assert sorted(cohort(wider).index) == ["x-1-bl", "x-1-m12", "x-2-bl"]


def test_any_numeric_range_can_be_set_and_must_be_ordered(tmp_path: Path) -> None:
    csv = "RID,VISCODE,MMSE\n1,bl,28\n2,bl,20\n"
    strict = ingest(tmp_path, csv, "source: x\nranges: {MMSE: [24, 30]}\n")
    assert found(strict) == [(3, "MMSE", "20", "out of range [24, 30]")]
    with pytest.raises(ValidationError, match="low 30 is above high 24"):
        ColumnMapping(source="x", ranges={"MMSE": (30, 24)})
    with pytest.raises(ValidationError, match="not numeric"):
        ColumnMapping(source="x", ranges={"PTGENDER": (0, 1)})


# --- the example -----------------------------------------------------------------


def test_the_example_mapping_shows_every_field_with_a_comment() -> None:
    text = (ROOT / "configs" / "mappings" / "example.yaml").read_text()
    for name in ColumnMapping.model_fields:  # set, or commented out as an alternative
        assert re.search(rf"^(# )?{name}:.*#", text, re.M), f"example.yaml: no {name} explained"
    for name in {*LabelMap.model_fields, *VisitFrom.model_fields}:
        assert re.search(rf"\b{name}:", text), f"example.yaml: no {name}"


def test_a_mapping_error_names_the_file_and_field(tmp_path: Path) -> None:
    yaml = tmp_path / "mapping.yaml"
    yaml.write_text("source: x\nderived: {WholeBrain: open('f')}\n")
    with pytest.raises(ConfigError, match=r"mapping\.yaml.*\n.*derived"):
        load_mapping(yaml)
