"""A command given a bad config, column mapping or run directory: one red line that names
the field (and the file) and the problem, exit code 2, before anything is written or Ray
starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from radiag.cli import app

pytestmark = pytest.mark.reliability

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]

CASES = {  # case: (arguments after `radiag cohort split|ingest`, what the line must say)
    "an unknown key": (["split", "--set", "split.trian=0.5"], "split.trian: Extra inputs are not permitted"),
    "a word for a number": (["split", "--set", "split.train=lots"], "split.train: Input should be a valid number"),
    "a negative count": (["ingest", "--set", "cohort.synthetic.subjects=-5"],
                         "cohort.synthetic.subjects: Input should be greater than or equal to 1"),
    "an unknown source": (["ingest", "--set", "cohort.source=oasis"], "cohort.source"),
    "a missing config file": (["ingest", "--config", "/nonexistent/run.yaml"],
                              "config file not found: /nonexistent/run.yaml"),
    "an override without a value": (["ingest", "--set", "run_dir"],
                                    "override 'run_dir' is not of the form key.path=value"),
}  # fmt: skip


@pytest.mark.parametrize(("args", "message"), CASES.values(), ids=CASES)
def test_a_bad_field_is_one_line_naming_it_and_exit_code_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    command, *rest = args
    result = runner.invoke(app, ["cohort", command, "--set", f"run_dir={tmp_path / 'run'}", *rest])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_config_that_is_not_a_mapping_is_named(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("- just\n- a list\n")
    result = runner.invoke(app, ["cohort", "ingest", "--config", str(config)])
    assert result.exit_code == 2
    assert f"{config}: top level must be a mapping" in result.output


def test_a_run_dir_that_is_a_file_is_refused_before_anything_runs(tmp_path: Path) -> None:
    occupied = tmp_path / "run"
    occupied.write_text("not a folder")
    result = runner.invoke(app, ["cohort", "ingest", "--set", f"run_dir={occupied}"])
    assert result.exit_code == 2, result.output
    assert f"run_dir {occupied}: cannot write there" in result.output
    assert occupied.read_text() == "not a folder"


def test_an_s3_run_dir_that_cannot_be_reached_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: closed
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    result = runner.invoke(app, ["cohort", "ingest", "--set", "run_dir=s3://radiag/unreachable"])
    assert result.exit_code == 2, result.output
    assert "run_dir s3://radiag/unreachable: cannot write there" in result.output
    assert "Traceback" not in result.output


EXAMPLE_MAPPING = yaml.safe_load((ROOT / "configs" / "mappings" / "example.yaml").read_text())
MAPPING_CASES = {  # case: (a change to the example mapping, what the refusal must say)
    "an unknown key": ({"colums": {"age": "AGE"}}, "colums: Extra inputs are not permitted"),
    "an expression that does not parse": ({"derived": {"Hippocampus": "hippocampus_cm3 *"}},
                                          "is not an arithmetic expression"),
    "a function call in an expression": (
        {"derived": {"Hippocampus": "__import__('os').system('touch PWNED')"}},
        "Call is not allowed"),
    "an attribute in an expression": ({"derived": {"Hippocampus": "hippocampus_cm3.real"}},
                                      "Attribute is not allowed"),
    "text in an expression": ({"derived": {"Hippocampus": "'1000' * 2"}}, "'1000' is not a number"),
    "a recode to text on a number": ({"values": {"MMSE": {"high": "thirty"}}},
                                     "values.MMSE: recodes to numbers, got ['thirty']"),
    "a recode to a number on text": ({"values": {"PTGENDER": {"M": 1, "F": 2}}},
                                     "values.PTGENDER: recodes to text, got [2.0, 1.0]"),
    "two columns for one target": ({"columns": {"mmse_total": "MMSE", "mmse_again": "MMSE"}},
                                   "more than one source for ['MMSE']"),
    "a target that is not canonical": ({"columns": {"colour": "FAVOURITE_COLOUR"}},
                                       "not canonical columns read from a file: ['FAVOURITE_COLOUR']"),
    "units on a text column": ({"units": {"PTGENDER": 10}}, "not numeric canonical columns: ['PTGENDER']"),
    "a range upside down": ({"ranges": {"AGE": [90, 40]}}, "ranges.AGE: low 90 is above high 40"),
    "labels with neither map nor thresholds": ({"labels": {"column": "diagnosis"}},
                                               "labels needs `map` or `at_least`"),
    "a label that is not a diagnosis": ({"labels": {"column": "diagnosis", "map": {"HC": "healthy"}}},
                                        "labels.map.HC: Input should be 'AD', 'MCI' or 'CN'"),
}  # fmt: skip


@pytest.mark.parametrize(("change", "message"), MAPPING_CASES.values(), ids=MAPPING_CASES)
def test_a_bad_column_mapping_is_refused_at_preflight_naming_its_file_and_field(
    tmp_path: Path, change: dict[str, object], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where an executed expression would leave its file
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(yaml.safe_dump(EXAMPLE_MAPPING | change))
    cohort = ["cohort.source=csv", f"cohort.path={ROOT / 'tests/fixtures/memoryclinic.csv'}",
              f"cohort.mapping={mapping}", f"run_dir={tmp_path / 'run'}"]  # fmt: skip
    result = runner.invoke(app, ["run", *(a for c in cohort for a in ("--set", c))])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert f"cohort.mapping: {mapping}: invalid config" in said and message in said, said
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "cohort").exists() and not (tmp_path / "PWNED").exists()
