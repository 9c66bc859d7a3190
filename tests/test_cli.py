"""The `radiag` command line, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

from radiag.cli import app

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def every_command(group: TyperGroup, path: tuple[str, ...] = ()) -> list[list[str]]:
    """Every command and sub-command of the app, walked from typer's click group."""
    found = [list(path)]
    for name, command in group.commands.items():
        if isinstance(command, TyperGroup):
            found += every_command(command, (*path, name))
        else:
            found.append([*path, name])
    return found


COMMANDS = every_command(typer.main.get_group(app))
runner = CliRunner()


def test_the_command_line_starts_without_the_libraries_only_some_stages_need() -> None:
    """torch, transformers, scikit-learn, matplotlib, MONAI, vLLM and openai load with the
    stage that uses them: together about 6 s of every command's start on 2 cores, paid
    by `radiag cohort`, `rationalize` and every job for nothing."""
    heavy = ("torch", "transformers", "sklearn", "matplotlib", "monai", "vllm", "openai")
    probe = f"import sys, radiag.cli; print([m for m in {heavy!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.strip() == "[]"


def test_the_help_test_walks_every_command() -> None:
    names = {" ".join(c) for c in COMMANDS}
    assert {"run", "rationalize", "diagnose", "distill", "baseline", "evaluate", "serve"} <= names
    assert {
        "cohort synth",
        "cohort ingest",
        "cohort mri",
        "cohort split",
        "models prepare",
    } <= names


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "radiag")
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    assert "--help" in result.output


NOT_STAGES = {"cohort", "models", "rationales", "synth", "prepare", "serve", "export", "batch-file"}
"""Command groups, and commands that write outside any run's stages."""


@pytest.mark.parametrize("command", [c for c in COMMANDS if c and c[-1] not in NOT_STAGES])
def test_every_stage_command_offers_fresh_and_verbose(command: list[str]) -> None:
    output = runner.invoke(app, [*command, "--help"], terminal_width=200).output
    assert "--fresh" in output and "--verbose" in output


def test_ingest_reports_quarantined_rows_and_keeps_the_rest(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["cohort", "ingest", "--set", f"run_dir={tmp_path}", "--set", "cohort.source=adnimerge",
         "--set", f"cohort.path={FIXTURES / 'ADNIMERGE_quirks.csv'}"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "cohort" / "stage.json").read_text())["summary"]
    assert summary["counts"]["visits"] == 7 and summary["counts"]["quarantined_rows"] == 7
    assert "quarantined rows by reason" in result.output
    assert "cohort visits=7" in result.output  # one line for the stage
    assert (tmp_path / "logs" / "radiag.log").is_file()


def test_a_refused_stage_identity_is_one_red_line_and_exit_code_2(tmp_path: Path) -> None:
    ingest = ["cohort", "ingest", "--set", f"run_dir={tmp_path}"]
    assert runner.invoke(app, [*ingest, "--set", "cohort.synthetic.subjects=20"]).exit_code == 0
    refused = runner.invoke(app, [*ingest, "--set", "cohort.synthetic.subjects=21"])
    assert refused.exit_code == 2
    assert "changed: config.synthetic.subjects" in refused.output and "--fresh" in refused.output
    assert "Traceback" not in refused.output
    fresh = runner.invoke(app, [*ingest, "--set", "cohort.synthetic.subjects=21", "--fresh"])
    assert fresh.exit_code == 0, fresh.output
    assert [p.name[:7] for p in (tmp_path / "superseded").iterdir()] == ["cohort-"]


def test_an_unexpected_error_shows_its_traceback_and_exits_1(tmp_path: Path) -> None:
    """Only expected user errors are one line; a bug keeps its traceback (and log file)."""
    (tmp_path / "splits").mkdir(parents=True)
    (tmp_path / "splits" / "stage.json").write_text("{not json")
    result = runner.invoke(app, ["baseline", "--set", f"run_dir={tmp_path}"])
    assert result.exit_code == 1
    assert "Traceback" in result.output and "JSONDecodeError" in result.output
    assert str(tmp_path / "logs" / "radiag.log") in result.output.replace("\n", "")
    assert "JSONDecodeError" in (tmp_path / "logs" / "radiag.log").read_text()


def test_a_library_runtime_error_is_not_turned_into_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old CLI printed any RuntimeError (a torch error, say) as one red line, exit 2."""

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr("radiag.cli.run_baseline", out_of_memory)
    result = runner.invoke(app, ["baseline", "--set", f"run_dir={tmp_path}"])
    assert result.exit_code == 1
    assert "Traceback" in result.output and "can't allocate memory" in result.output


def test_evaluate_with_only_run_uses_the_config_the_run_recorded(tmp_path: Path) -> None:
    """`radiag evaluate --run DIR` must not fall back to defaults (which have no judge)."""
    from radiag.cli import _config_of_run
    from radiag.pipeline import RunConfig

    recorded = RunConfig.model_validate(
        {"evaluate": {"bootstrap": 7, "judge": {"criteria": ["consistency"], "limit": 2}}}
    )
    (tmp_path / "manifest.json").write_text(
        json.dumps({"config": recorded.model_dump(mode="json")})
    )
    cfg = _config_of_run(str(tmp_path), ["evaluate.seed=3"]).evaluate
    assert cfg is not None and (cfg.bootstrap, cfg.seed) == (7, 3)
    assert cfg.judge is not None and cfg.judge.criteria == ["consistency"]


def test_an_unreadable_cohort_file_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    broken = tmp_path / "ADNIMERGE.csv"
    broken.write_bytes(b"\x00\xff\xfe\x00")
    result = runner.invoke(
        app,
        [
            "cohort",
            "ingest",
            "--set",
            f"run_dir={tmp_path}",
            "--set",
            "cohort.source=adnimerge",
            "--set",
            f"cohort.path={broken}",
        ],
    )
    assert result.exit_code == 2
    assert f"{broken}: not a readable CSV" in result.output
    assert "Traceback" not in result.output


def test_a_bad_config_field_is_named(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "cohort",
            "split",
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            "--set",
            "split.trian=0.5",
        ],
    )
    assert result.exit_code == 2
    assert "split.trian" in result.output


def test_synth_writes_an_adnimerge_shaped_file(tmp_path: Path) -> None:
    out = tmp_path / "ADNIMERGE.csv"
    result = runner.invoke(
        app, ["cohort", "synth", str(out), "--set", "cohort.synthetic.subjects=25"]
    )
    assert result.exit_code == 0, result.output
    header = out.read_text().splitlines()[0].split(",")
    assert {"RID", "PTID", "VISCODE", "DX_bl", "DX", "AGE", "Years_bl", "ABETA"} <= set(header)


def test_a_stage_command_on_a_new_run_runs_the_cohort_stages_first_and_only_once(
    tmp_path: Path,
) -> None:
    """`radiag baseline` (as `python -m jobs.baseline`) on an empty run directory: the
    cohort and its splits are made first, each saying so; the next command finds them."""
    run = ["--set", f"run_dir={tmp_path / 'run'}", "--set", "cohort.synthetic.subjects=60",
           "--set", "mri.subjects=0", "--set", "baseline.classifiers=[logistic]"]  # fmt: skip
    first = runner.invoke(app, ["baseline", *run])
    assert first.exit_code == 0, first.output
    assert "first: stage cohort has not run" in first.output
    assert "first: stage splits has not run" in first.output
    assert (tmp_path / "run" / "splits" / "test.parquet").is_file()

    again = runner.invoke(app, ["baseline", *run])
    assert again.exit_code == 0, again.output
    assert "first:" not in again.output
