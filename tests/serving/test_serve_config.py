"""serve/config.yaml is the application `radiag serve` builds, and a bad setup fails at once."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from radiag.cli import app
from radiag.cohort.describe import DescribeConfig
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
from radiag.cohort.synthetic import SynthConfig
from radiag.serving.app import (
    ConfigurationError,
    build_app,
    model_fields,
    read_token,
    served_models,
    teacher_cpus,
    unschedulable,
)
from radiag.serving.config import AUTO_CPUS, ServeConfig, TeacherServeConfig, sized_to_cluster
from radiag.serving.teacher import teacher_llm_config
from radiag.store import RunStore
from radiag.teacher.engines import VllmEngineConfig
from radiag.teacher.stages import DiagnoseConfig

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


def test_serving_the_teacher_of_a_run_without_its_diagnosis_is_one_line_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by hand: Serve's build task raised it, Ray retried the task three times (about
    a minute) and the command printed its traceback."""
    monkeypatch.setenv("RADIAG_SERVE_TOKEN", "0123456789abcdef0123456789abcdef")
    run = tmp_path / "run"
    ingest(IngestConfig(synthetic=SynthConfig(subjects=20, max_visits=1)), RunStore(str(run)))
    describe_and_split(DescribeConfig(), SplitConfig(), RunStore(str(run)))
    result = CliRunner().invoke(app, ["serve", "--run", str(run), "--teacher"])
    assert result.exit_code == 2
    assert "the run has no teacher diagnosis stage to serve" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_unset_cpu_requests_fit_a_two_core_machine_beside_the_teacher() -> None:
    defaults = ServeConfig(run_dir="x")
    sized = sized_to_cluster(defaults, {"students": 2, "baselines": 1}, 2.0, teacher_cpus=1.0)
    cpus = [sized.students.scaling.num_cpus, sized.baselines.scaling.num_cpus]
    assert cpus == [0.33, 0.33]  # the one CPU the teacher leaves, shared by three replicas
    alone = sized_to_cluster(defaults, {"students": 2, "baselines": 1}, 2.0, teacher_cpus=0.0)
    assert alone.students.scaling.num_cpus == alone.baselines.scaling.num_cpus == AUTO_CPUS
    crowded = sized_to_cluster(defaults, {"students": 2, "baselines": 1}, 1.0, teacher_cpus=1.0)
    assert crowded.students.scaling.num_cpus == 0.0  # no reservation rather than no replica


def test_explicit_cpu_requests_are_kept_and_count_against_the_rest() -> None:
    cfg = ServeConfig.model_validate(
        {"run_dir": "x", "baselines": {"scaling": {"num_cpus": 0.1, "min_replicas": 2}}}
    )
    sized = sized_to_cluster(cfg, {"students": 1, "baselines": 1}, 2.0, teacher_cpus=1.0)
    assert sized.baselines.scaling.num_cpus == 0.1
    assert sized.students.scaling.num_cpus == AUTO_CPUS  # 1 + 2 x 0.1 + 0.5 <= 2
    greedy = ServeConfig.model_validate(
        {"run_dir": "x", "students": {"scaling": {"num_cpus": 4}},
         "baselines": {"scaling": {"num_cpus": 0.1}}}
    )  # fmt: skip
    assert sized_to_cluster(greedy, {"students": 1, "baselines": 1}, 2.0, 1.0) == greedy


def test_a_teacher_given_cpus_and_a_resource_reserves_them_in_its_engine_bundle(
    tiny_model: Path,
) -> None:
    """What puts a large CPU teacher on a node group of its own (the RayService's)."""
    from ray.llm._internal.serve.core.server.llm_server import LLMServer

    run = DiagnoseConfig(engine=VllmEngineConfig(model={"path": str(tiny_model)}))
    default = TeacherServeConfig()
    placed = TeacherServeConfig(
        num_cpus=8, resources={"teacher": 1}, min_replicas=2, max_replicas=2
    )

    def bundles(cfg: TeacherServeConfig) -> list[dict[str, float]]:
        options = LLMServer.get_deployment_options(teacher_llm_config(cfg, run))
        return [{k: v for k, v in b.items() if v} for b in options["placement_group_bundles"]]

    assert bundles(default) == [{"CPU": 1}]  # ray.serve.llm's own
    assert bundles(placed) == [{"CPU": 8, "teacher": 1}]
    sized_by = teacher_cpus(teacher_llm_config(placed, run), placed)
    assert sized_by == 16  # what the students and baselines are sized around
    with pytest.raises(ValueError, match=r"teacher\.max_replicas must be >= teacher\.min_replicas"):
        TeacherServeConfig(min_replicas=2)


def test_models_to_serve_must_be_models_of_the_run(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path))
    store.write_bytes("baselines/baseline-logistic-tabular.joblib", b"fitted")
    chosen = ServeConfig(run_dir=str(tmp_path), models=["baseline-logistic-tabular"])
    assert list(served_models(chosen, store)) == ["baseline-logistic-tabular"]
    with pytest.raises(ConfigurationError, match="models student-text: not served from"):
        served_models(chosen.model_copy(update={"models": ["student-text"]}), store)


def test_a_section_with_no_deployment_is_not_sized() -> None:
    greedy = ServeConfig.model_validate({"run_dir": "x", "students": {"scaling": {"num_cpus": 3}}})
    sized = sized_to_cluster(greedy, {"students": 1, "baselines": 0}, 2.0, teacher_cpus=0.0)
    assert sized.baselines.scaling.num_cpus is None and sized.students.scaling.num_cpus == 3


def test_a_deployment_waiting_for_resources_is_named_with_serves_own_line() -> None:
    """What `deploy` relays from `serve.status()` while the app is not running (Serve's
    status types, as Serve fills them for a replica it cannot place)."""
    from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger
    from ray.serve.schema import (
        ApplicationStatus,
        ApplicationStatusOverview,
        DeploymentStatusOverview,
    )

    waiting = (
        "Deployment 'student-text' in application 'radiag' has 1 replicas that have taken "
        'more than 30s to be scheduled. ... Resources required for each replica: {"CPU": 3.0}, '
        'total resources available: {"CPU": 2.0}.'
    )
    deployments = {
        "student-text": DeploymentStatusOverview(
            DeploymentStatus.UPDATING, DeploymentStatusTrigger.CONFIG_UPDATE_STARTED, {}, waiting
        ),
        "ingress": DeploymentStatusOverview(
            DeploymentStatus.HEALTHY, DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED, {}, ""
        ),
    }
    status = ApplicationStatusOverview(ApplicationStatus.DEPLOYING, "", 0.0, deployments)
    assert unschedulable(status) == {"student-text": f"student-text waits for resources: {waiting}"}
    assert unschedulable(None) == {}


def test_a_model_reads_the_fields_its_description_or_feature_set_names() -> None:
    """What the page greys out: a description without MRI reads no volume; a visit's age is
    AGE + Years_bl, so a model that reads the age reads both."""
    no_mri = DescribeConfig(features=["demographics", "mmse"])
    assert model_fields("teacher", "teacher", no_mri) == [
        "Years_bl", "AGE", "age_at_visit", "PTGENDER", "PTEDUCAT", "PTMARRY", "MMSE",
    ]  # fmt: skip
    tabular = model_fields("baseline-gradient_boosting-tabular", "baseline", no_mri)
    assert "Hippocampus" in tabular and "ICV" in tabular and "MMSE" not in tabular
