"""Configs: every shipped YAML validates, and a bad field is named in the error."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from radiag.cohort.mapping import MAPPINGS_DIR, ColumnMapping
from radiag.cohort.stages import IngestConfig
from radiag.config import ConfigError, load_config
from radiag.pipeline import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def assert_loaded_as_written(written: Any, loaded: Any, path: str = "") -> None:
    """Every value the YAML sets reaches the validated config unchanged (none dropped)."""
    if isinstance(written, dict):
        assert isinstance(loaded, dict), f"{path}: not a section"
        for key, value in written.items():
            assert key in loaded, f"{path}.{key} was dropped"
            assert_loaded_as_written(value, loaded[key], f"{path}.{key}")
    elif isinstance(written, list):
        assert len(written) == len(loaded), path
        for i, (w, item) in enumerate(zip(written, loaded, strict=True)):
            assert_loaded_as_written(w, item, f"{path}[{i}]")
    else:
        assert loaded == written, f"{path}: wrote {written!r}, loaded {loaded!r}"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_run_config_loads_exactly_what_it_says(path: Path) -> None:
    cfg = load_config(RunConfig, path)
    assert_loaded_as_written(yaml.safe_load(path.read_text()), cfg.model_dump(mode="json"))


def test_the_demo_config_runs_every_stage_on_the_bundled_teacher() -> None:
    cfg = load_config(RunConfig, ROOT / "configs" / "demo.yaml")
    assert cfg.rationalize is not None and cfg.diagnose is not None and cfg.evaluate is not None
    assert cfg.rationalize.engine == cfg.diagnose.engine  # one YAML anchor
    assert cfg.rationalize.engine.model.bundled == "smollm2-135m-instruct"
    assert cfg.students.text is not None and cfg.students.vlm is not None
    assert cfg.evaluate.judge is not None and cfg.ray.num_cpus == 2


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "cohorts").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_cohort_config_loads_exactly_what_it_says(path: Path) -> None:
    cfg = load_config(IngestConfig, path)
    assert_loaded_as_written(yaml.safe_load(path.read_text()), cfg.model_dump(mode="json"))


def test_make_demo_ends_with_a_transfer_to_the_synthetic_second_site() -> None:
    demo = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    transfer = shlex.split(demo.replace("\\\n", " ").strip().splitlines()[-1])
    assert transfer[1:3] == ["transfer", "--from"]
    assert transfer[3] == load_config(RunConfig, ROOT / "configs" / "demo.yaml").run_dir
    cohort = load_config(IngestConfig, ROOT / transfer[transfer.index("--cohort") + 1])
    assert cohort.source == "synthetic" and cohort.synthetic.site is not None
    # The site measures fewer regions: the baselines are refitted on what both measure.
    assert "shared_features_only=true" in transfer


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "configs" / "mappings").glob("*.yaml")) + sorted(MAPPINGS_DIR.glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_every_shipped_mapping_validates(path: Path) -> None:
    assert load_config(ColumnMapping, path).source


def test_overrides_are_parsed_as_yaml_and_reach_nested_fields() -> None:
    cfg = load_config(
        RunConfig,
        ROOT / "configs" / "demo.yaml",
        ["cohort.synthetic.subjects=12", "describe.features=[demographics, mri]", "run_dir=/x"],
    )
    assert cfg.cohort.synthetic.subjects == 12
    assert cfg.describe.features == ["demographics", "mri"]
    assert cfg.run_dir == "/x"


def test_an_invalid_field_is_named_by_its_dotted_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cohort:\n  synthetic:\n    subjects: -3\nsplit:\n  trian: 0.7\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, bad)
    message = str(err.value)
    assert str(bad) in message
    assert "cohort.synthetic.subjects" in message
    assert "split.trian" in message  # a typo is an error, not silently ignored


def test_split_fractions_must_sum_to_one() -> None:
    with pytest.raises(ConfigError, match="must be 1"):
        load_config(RunConfig, None, ["split.train=0.9"])


def test_a_missing_config_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RunConfig, tmp_path / "nope.yaml")


def test_synthetic_mri_is_refused_for_real_cohorts() -> None:
    with pytest.raises(ConfigError, match="only for the synthetic cohort"):
        load_config(
            RunConfig, None, ["cohort.source=adnimerge", "cohort.path=x.csv", "mri.subjects=3"]
        )


def test_a_rationale_then_label_student_set_to_answer_without_its_rationale_is_refused() -> None:
    # Its answer follows its own rationale: scored right after the prompt it would answer a
    # sequence it never trained on (the CPU preset measured that arm at chance).
    overrides = ["students.text.loss=rationale_label", "students.diagnose.generate_rationale=false"]
    with pytest.raises(ConfigError, match=r"students.text: loss rationale_label .* set students"):
        load_config(RunConfig, None, overrides)
    load_config(RunConfig, None, [*overrides[1:], "students.text.loss=step_by_step"])
