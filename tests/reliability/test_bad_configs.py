"""A command given a bad config or run directory: one red line that names the field or the
path and the problem, exit code 2, before anything is written or Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest
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
