"""Preflight: every outside thing a run needs is checked before Ray or an engine starts,
and all problems come back together, one line each."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from stubs import JsonEndpoint
from typer.testing import CliRunner

from radiag.cli import app
from radiag.logs import RAY_JOB_CONFIG_ENV
from radiag.pipeline import RunConfig
from radiag.preflight import PreflightError, preflight, writable

KEY = "sk-preflight-test"


@pytest.fixture(scope="module")
def models_endpoint() -> Iterator[str]:
    """A real HTTP server answering GET /v1/models like an OpenAI-compatible endpoint that
    serves `teacher-70b` to requests bearing KEY, and 401 to any other."""

    class Handler(JsonEndpoint):
        def do_GET(self) -> None:
            ok = self.headers.get("Authorization") == f"Bearer {KEY}"
            body = {"object": "list", "data": [{"id": "teacher-70b", "object": "model"}]}
            self.send_json(body if ok else {"error": {"message": "bad key"}}, 200 if ok else 401)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def config(tmp_path: Path, **sections: object) -> RunConfig:
    return RunConfig.model_validate({"run_dir": str(tmp_path / "run"), **sections})


def openai_teacher(base_url: str, model: str = "teacher-70b") -> dict:
    return {"engine": {"backend": "openai", "base_url": base_url, "model": model}}


def test_a_runnable_config_passes(tmp_path: Path, models_endpoint: str, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    preflight(config(tmp_path, rationalize=openai_teacher(models_endpoint)))


def test_every_problem_is_one_line_naming_what_and_where(
    tmp_path: Path, models_endpoint: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    no_config = tmp_path / "empty-model"
    no_config.mkdir()
    cfg = RunConfig.model_validate(
        {
            "run_dir": "s3://no-such-bucket/runs/a",
            "cohort": {"source": "adnimerge", "path": str(tmp_path / "ADNIMERGE.csv")},
            "mri": {"subjects": 0},
            "rationalize": openai_teacher(models_endpoint),
            "diagnose": openai_teacher("http://127.0.0.1:9/v1"),
            "students": {"text": {"model": {"path": str(no_config)}}},
        }
    )
    with pytest.raises(PreflightError) as raised:
        preflight(cfg)
    lines = [line.strip() for line in str(raised.value).splitlines()[1:]]
    assert len(lines) == 5, lines
    assert "bucket 'no-such-bucket' does not exist" in lines[0]
    assert lines[1].endswith("ADNIMERGE.csv: not found")
    assert lines[2].startswith("rationalize:") and "refused the key in $OPENAI_API_KEY" in lines[2]
    assert lines[3].startswith("diagnose:") and "does not answer" in lines[3]
    assert lines[4] == f"students.text: model directory {no_config} has no config.json"


def test_only_the_stages_about_to_run_are_checked(tmp_path: Path) -> None:
    cfg = config(tmp_path, diagnose=openai_teacher("http://127.0.0.1:9/v1"))
    preflight(cfg, ["rationalize", "baseline"])  # the dead endpoint is the diagnose stage's
    with pytest.raises(PreflightError, match=r"diagnose: http://127\.0\.0\.1:9/v1 does not answer"):
        preflight(cfg, ["diagnose"])


def test_an_endpoint_without_the_configured_model_is_named(
    tmp_path: Path, models_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cfg = config(tmp_path, diagnose=openai_teacher(models_endpoint, model="teacher-8b"))
    with pytest.raises(PreflightError, match="does not serve model 'teacher-8b'"):
        preflight(cfg)


def test_a_stage_command_fails_in_preflight_with_exit_2(tmp_path: Path) -> None:
    dead = "diagnose.engine={backend: openai, base_url: 'http://127.0.0.1:9/v1', model: m}"
    result = CliRunner().invoke(
        app, ["diagnose", "--set", f"run_dir={tmp_path / 'run'}", "--set", dead]
    )
    assert result.exit_code == 2
    assert "preflight found problems" in result.output and "does not answer" in result.output


def test_a_relative_run_dir_is_refused_in_a_ray_job_and_absolute_ones_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job runs in Ray's temporary copy of its working dir: `runs/x` would be deleted
    with it. Ray's job supervisor marks a job's environment with RAY_JOB_CONFIG_ENV."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, "{}")
    (problem,) = writable("runs/x")
    assert problem.startswith("run_dir runs/x: a relative path in a Ray job")
    assert str(tmp_path) in problem and "s3://" in problem
    assert writable(str(tmp_path / "runs" / "x")) == []

    monkeypatch.delenv(RAY_JOB_CONFIG_ENV)  # outside a job, relative is relative to where you are
    assert writable("runs/x") == []


def test_a_model_cache_that_cannot_be_written_is_named_with_the_variable_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bundled teacher is converted into the model cache: a cache under a file (as
    unwritable as another user's /models) is refused before Ray starts."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("RADIAG_MODEL_CACHE", str(blocker / "cache"))
    cfg = RunConfig.model_validate({"run_dir": str(tmp_path / "run"), "rationalize": {}})
    with pytest.raises(PreflightError) as refused:
        preflight(cfg, ["rationalize"])
    (line,) = [p for p in str(refused.value).splitlines() if "model cache" in p]
    assert str(blocker / "cache") in line and "set RADIAG_MODEL_CACHE" in line

    monkeypatch.setenv("RADIAG_MODEL_CACHE", str(tmp_path / "cache"))
    preflight(cfg, ["rationalize"])  # a writable cache passes
