"""`radiag experiments`: the shared stages once, every arm under the stage contract, then
the table, the paired comparisons and the report.

Layout of `<output_dir>/<name>/`:

- `shared/`: a run with the cohort, MRI, splits and rationales.
- `arms/<arm>/`: a run per arm. The shared stages' tables and records are copied in
  (MRI volumes are not: the MRI table names them where they are), so the arm's own
  stages see finished upstream stages of the same identity and read them as in any run.
- `arm.json` in each arm: its stage identities and the wall time of the invocation
  that finished it; the table reads it.
- `external/<arm>/`: with an `external` cohort, the `radiag transfer` run of the arm's
  models on it (its own stages, under the stage contract too).
- the table, comparisons and report (`radiag.experiments.table`, `.report`).

Run again, nothing finished is redone: the shared stages and every finished arm are
skipped by the stage contract, a killed arm resumes where its stages stopped.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable
from functools import partial

import pyarrow.fs as pafs

from radiag import transfer
from radiag.cohort.stages import COHORT_STAGE, MRI_STAGE, SPLITS_STAGE
from radiag.contract import Stage, StageSummary
from radiag.experiments.config import SHARED_STAGES, Arm, ExperimentsConfig
from radiag.pipeline import run
from radiag.store import RunStore
from radiag.teacher.stages import RATIONALIZE_STAGE

ARM_RECORD = "arm.json"
VOLUME_SUFFIXES = (".nii", ".nii.gz")  # read where the shared run wrote them
_SHARED_OUTPUTS: tuple[Stage, ...] = (COHORT_STAGE, MRI_STAGE, SPLITS_STAGE, RATIONALIZE_STAGE)


def run_experiments(
    cfg: ExperimentsConfig,
    fresh: bool = False,
    on_stage: Callable[[str], None] = lambda _: None,
    on_done: Callable[[StageSummary], None] = lambda _: None,
) -> dict[str, dict[str, StageSummary]]:
    """Run the shared stages, then each arm's; returns each run's stage summaries by
    run ("shared" or the arm's name). `fresh` as in `radiag run`, for every stage."""
    shared_cfg = cfg.shared_run()
    shared_stage = partial(_labelled, "shared", on_stage)
    done = {"shared": run(shared_cfg, fresh, shared_stage, on_done)}
    shared = RunStore(shared_cfg.run_dir)
    for arm in cfg.arms:
        done[arm.name] = run_arm(cfg, arm, shared, fresh, on_stage, on_done)
        if cfg.external is not None and arm.mri_only is None:
            done[f"{arm.name} external"] = run_external(cfg, arm, fresh, on_stage, on_done)
    return done


def run_external(
    cfg: ExperimentsConfig,
    arm: Arm,
    fresh: bool = False,
    on_stage: Callable[[str], None] = lambda _: None,
    on_done: Callable[[StageSummary], None] = lambda _: None,
) -> dict[str, StageSummary]:
    """The arm's models on the external cohort: `radiag transfer` from the arm's run."""
    assert cfg.external is not None
    overrides = [
        f"shared_features_only={str(cfg.external.shared_features_only).lower()}",
        f"bootstrap={cfg.bootstrap}",
    ]
    external = transfer.transfer_config(
        cfg.arm_run(arm).run_dir, cfg.external.cohort, cfg.external_dir(arm), overrides
    )
    external_stage = partial(_labelled, f"{arm.name} (external)", on_stage)
    return transfer.run(external, fresh, external_stage, on_done)


def run_arm(
    cfg: ExperimentsConfig,
    arm: Arm,
    shared: RunStore,
    fresh: bool = False,
    on_stage: Callable[[str], None] = lambda _: None,
    on_done: Callable[[StageSummary], None] = lambda _: None,
) -> dict[str, StageSummary]:
    """One arm: the shared outputs linked in, its own stages run, `arm.json` written."""
    arm_cfg = cfg.arm_run(arm)
    store = RunStore(arm_cfg.run_dir)
    link_shared(shared, store)
    start = time.perf_counter()
    arm_stage = partial(_labelled, arm.name, on_stage)
    done = run(arm_cfg, fresh, arm_stage, on_done, skip=SHARED_STAGES)
    identities = {name: summary.identity for name, summary in done.items()}
    if store.exists(ARM_RECORD) and store.read_json(ARM_RECORD)["identities"] == identities:
        return done  # finished before: its wall time is that of the run that finished it
    store.write_json(
        ARM_RECORD,
        {
            "arm": arm.name,
            "kind": arm.kind,
            "identities": identities,
            "wall_seconds": round(time.perf_counter() - start, 1),
            "stages": {name: summary.model_dump() for name, summary in done.items()},
        },
    )
    return done


def _labelled(label: str, on_stage: Callable[[str], None], name: str) -> None:
    on_stage(f"{label}: {name}")


def link_shared(shared: RunStore, arm: RunStore) -> None:
    """Copy the shared stages' tables and records into an arm's run (not the MRI volumes,
    which the MRI table names by their place in the shared run). Run again, it copies the
    same bytes: an arm always reads the shared run as it is now."""
    for stage in _SHARED_OUTPUTS:
        for directory in (stage.directory, *stage.also):
            selector = pafs.FileSelector(
                shared.path(directory), allow_not_found=True, recursive=True
            )
            for info in shared.fs.get_file_info(selector):
                if info.type != pafs.FileType.File or info.path.endswith(VOLUME_SUFFIXES):
                    continue
                relative = posixpath.relpath(info.path, shared.root)
                arm.write_bytes(relative, shared.read_bytes(relative))
