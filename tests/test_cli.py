"""The `radiag` command line, as a user runs it."""

from __future__ import annotations

import json
import os
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


@pytest.mark.parametrize(
    "command",
    [c for c in COMMANDS if c and c[-1] not in {"cohort", "models", "synth", "prepare", "serve"}],
)
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


@pytest.mark.slow
def test_run_does_every_stage_then_resumes_without_redoing_work(
    tmp_path: Path, model_cache: Path, tiny_model: Path, stub_teacher: str
) -> None:
    """The demo config, smaller: the teacher is the session's OpenAI-compatible stub and
    there is no LLM judge (the real vLLM teacher stages and judge are tests/teacher and
    tests/evaluation/test_judge.py; the demo's own engines, tests/test_interrupt.py)."""
    run_dir = tmp_path / "run"
    stub = f"{{backend: openai, base_url: '{stub_teacher}', model: stub}}"
    command = [
        sys.executable, "-m", "radiag.cli", "run", "--config", str(ROOT / "configs" / "demo.yaml"),
        "--set", f"run_dir={run_dir}", "--set", "cohort.synthetic.subjects=80", "--set", "mri.subjects=4",
        "--set", f"rationalize.engine={stub}", "--set", f"diagnose.engine={stub}",
        "--set", "rationalize.limit=6", "--set", "diagnose.limit=4", "--set", "evaluate.judge=null",
        "--set", "students.diagnose={limit: 4, max_new_tokens: 8}",
    ]  # fmt: skip
    for kind in ("text", "vlm"):  # two steps of the tiny model; its random rationales get flagged
        command += [
            "--set", f"students.{kind}.model={{path: {tiny_model}}}",
            "--set", f"students.{kind}.optim={{max_steps: 2, batch_size: 2}}",
            "--set", f"students.{kind}.include_flagged=true",
        ]  # fmt: skip
    env = os.environ | {"RADIAG_MODEL_CACHE": str(model_cache)}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) == {
        "cohort", "mri", "splits", "rationalize", "diagnose", "baseline",
        "distill-text", "diagnose-student-text", "distill-vlm", "diagnose-student-vlm", "evaluate",
    }  # fmt: skip
    assert manifest["stages"]["rationalize"]["counts"]["rows"] == 6
    assert manifest["stages"]["diagnose"]["counts"]["rows"] == 4
    assert manifest["stages"]["distill-text"]["counts"]["steps"] == 2
    assert manifest["stages"]["diagnose-student-text"]["counts"]["rows"] == 4
    identities = {name: stage["identity"] for name, stage in manifest["stages"].items()}
    assert all(len(identity) == 16 for identity in identities.values())
    assert (run_dir / "checkpoints" / "vlm" / "final" / "mri_prefix.pt").is_file()
    assert manifest["precision"]["auto"] in {"bfloat16", "float32"}  # the machine's, recorded
    assert (run_dir / "reports" / "report.html").is_file()
    assert f"report: {run_dir / 'reports' / 'report.html'}" in first.stderr.replace("\n", "")
    assert manifest["versions"]["ray"] == "2.60.0" and manifest["seeds"]["split"] == 0
    assert manifest["stages"]["mri"]["counts"] == {"volumes": 4, "failed": 0}
    test_split = run_dir / "splits" / "test.parquet"
    assert test_split.exists() and len(list((run_dir / "mri").glob("*_seg.nii.gz"))) == 4

    assert len(list((run_dir / "rationales").glob("part-*.parquet"))) >= 1
    assert len(list((run_dir / "rationales").glob("part-*.parquet"))) >= 1
    written = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.parquet")}
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.parquet")} == written
    again = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert {name: stage["identity"] for name, stage in again.items()} == identities
    # Quiet by default: one line per stage, not the engines' and Ray's logs.
    lines = [line for line in second.stderr.splitlines() if "smoke run:" not in line]
    assert len(lines) < 40, second.stderr  # smoke-run lines: one per model of the demo's size
    assert (run_dir / "logs" / "radiag.log").is_file() and (run_dir / "logs" / "ray").is_dir()
