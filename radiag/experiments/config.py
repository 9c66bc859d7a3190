"""`radiag experiments` config: one cohort and its shared stages, then a list of arms.

An arm is the stages that make one model (a teacher prompting, a student recipe, a
classical baseline) on the shared run's cohort, splits and rationales. Every arm's run is
an ordinary run config (`RunConfig`): the shared sections are the experiment's, the
model's section is the arm's, so each arm runs under the stage contract like `radiag run`.
"""

from __future__ import annotations

import posixpath
from typing import Literal

from pydantic import Field, model_validator

from radiag.baseline import BaselineConfig
from radiag.config import StrictModel
from radiag.pipeline import CohortStagesConfig, RayConfig, RunConfig
from radiag.students.config import MriOnlyConfig, StudentsConfig
from radiag.teacher.stages import DiagnoseConfig

ArmKind = Literal["teacher", "student", "baseline", "mri"]
ARM_KINDS: dict[str, ArmKind] = {
    "diagnose": "teacher", "students": "student", "baseline": "baseline", "mri_only": "mri",
}  # fmt: skip
"""An arm's model is exactly one of these sections; each makes one kind of model."""
SHARED_STAGES = ("cohort", "mri", "splits", "rationalize")
"""Stages every arm reads and none redoes: they run once, in the experiment's shared run."""


class Arm(StrictModel):
    """One model of the comparison: exactly one of `diagnose` (the teacher), `students`
    (one student: `text` or `vlm`), `baseline` or `mri_only`."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="its folder and table row")
    description: str = Field("", description="what the arm tests, for the table and report")
    diagnose: DiagnoseConfig | None = None
    students: StudentsConfig | None = None
    baseline: BaselineConfig | None = None
    mri_only: MriOnlyConfig | None = None

    @model_validator(mode="after")
    def _one_model(self) -> Arm:
        given = [s for s in ARM_KINDS if getattr(self, s) is not None]
        if len(given) != 1:
            raise ValueError(
                f"arm {self.name!r}: give exactly one of {', '.join(ARM_KINDS)} "
                f"(got {', '.join(given) or 'none'})"
            )
        if self.students is not None and (self.students.text is None) == (
            self.students.vlm is None
        ):
            raise ValueError(f"arm {self.name!r}: students needs exactly one of text, vlm")
        return self

    @property
    def kind(self) -> ArmKind:
        return next(
            kind for section, kind in ARM_KINDS.items() if getattr(self, section) is not None
        )


class ExternalCohort(StrictModel):
    """Another cohort every arm's models also diagnose, as `radiag transfer` does (the
    paper: ADNI -> AIBL); the MRI-only model is not carried over (transfer has no path
    for it), and its table row says so by an empty external column."""

    cohort: str = Field(description="the other cohort's ingest YAML (as `radiag transfer`)")
    shared_features_only: bool = Field(
        True, description="refit a baseline on the features both cohorts measure"
    )


class ExperimentsConfig(CohortStagesConfig):
    """An experiment: the shared stages (the sections of a run config every model reads:
    rationales included), the arms and the reference arm every other arm is compared with."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    output_dir: str = Field(
        "experiments", description="local path or s3://...; the experiment is <output_dir>/<name>"
    )
    arms: list[Arm] = Field(min_length=1)
    external: ExternalCohort | None = Field(
        None, description="another cohort every arm is also scored on; null: none"
    )
    reference: str = Field(description="the arm every other arm is compared with")
    bootstrap: int = Field(1000, ge=0, description="subject resamples for every CI")
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _arms_are_named_once(self) -> ExperimentsConfig:
        names = [arm.name for arm in self.arms]
        if repeated := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"arm names repeat: {', '.join(repeated)}")
        if self.reference not in names:
            raise ValueError(f"reference {self.reference!r} is not an arm ({', '.join(names)})")
        return self

    @property
    def root(self) -> str:
        return posixpath.join(self.output_dir.rstrip("/"), self.name)

    def external_dir(self, arm: Arm) -> str:
        """The external cohort's run for one arm's models (`radiag transfer`'s run_dir)."""
        return posixpath.join(self.root, "external", arm.name)

    def shared_run(self) -> RunConfig:
        """The run of the shared stages: cohort, MRI, splits and rationales, nothing else."""
        return self._run("shared", StudentsConfig())

    def arm_run(self, arm: Arm) -> RunConfig:
        """The arm's own run: the shared sections as they are, and its model's section."""
        return self._run(
            f"arms/{arm.name}",
            arm.students or StudentsConfig(),
            diagnose=arm.diagnose,
            baseline=arm.baseline,
            mri_only=arm.mri_only,
        )

    def _run(self, folder: str, students: StudentsConfig, **model: object) -> RunConfig:
        shared = {name: getattr(self, name) for name in CohortStagesConfig.model_fields}
        return RunConfig.model_validate(
            {
                **shared,
                "run_dir": posixpath.join(self.root, folder),
                "students": students,
                "ray": self.ray,
                **model,
            }
        )
