"""serve/config.yaml is the application `radiag serve` builds, and a bad setup fails at once."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from radiag.cli import app
from radiag.serving.app import ConfigurationError, build_app, read_token
from radiag.serving.config import ServeConfig

SERVE_CONFIG = Path(__file__).parents[2] / "serve" / "config.yaml"


def test_the_serve_config_file_names_the_builder_and_valid_args() -> None:
    tree = yaml.safe_load(SERVE_CONFIG.read_text())
    (application,) = tree["applications"]
    module, _, attribute = application["import_path"].partition(":")
    assert getattr(importlib.import_module(module), attribute) is build_app
    assert application["route_prefix"] == "/"
    cfg = ServeConfig.model_validate(application["args"])
    assert cfg.teacher is not None and cfg.students.scaling.min_replicas >= 1
    assert cfg.teacher.min_replicas >= 1


def test_a_short_or_missing_token_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("RADIAG_SERVE_TOKEN", raising=False)
    with pytest.raises(ConfigurationError, match="RADIAG_SERVE_TOKEN"):
        read_token(ServeConfig(run_dir="x"))
    monkeypatch.setenv("RADIAG_SERVE_TOKEN", "short")
    with pytest.raises(ConfigurationError, match="16 characters"):
        read_token(ServeConfig(run_dir="x"))
    secret = tmp_path / "token"
    secret.write_text("from-a-mounted-secret-0123\n")
    assert (
        read_token(ServeConfig(run_dir="x", token_file=str(secret))) == "from-a-mounted-secret-0123"
    )


def test_radiag_serve_without_a_token_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("RADIAG_SERVE_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["serve", "--run", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "no serving token" in result.output
