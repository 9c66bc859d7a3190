"""`radiag transfer`: a trained run's models diagnose another cohort (the paper: ADNI -> AIBL).

The external cohort gets a run of its own (`run_dir`); the source run is only read. Its
stages, each under the stage contract (`radiag.contract`: a rerun skips what is done, a
killed one resumes, another identity is refused or, with `fresh`, superseded):

1. cohort: `ingest` of the other cohort (`cohort`).
2. splits: described as the source run describes (`describe`, its recorded config) and
   graded against the source run's saved norm by default, so "Mild atrophy" means the
   same in both cohorts (`--set describe.norm=reference` grades against the published
   values instead); every subject lands in test (`EXTERNAL_SPLIT`). An external subject
   that is also a source subject is refused: the models have seen it.
3. transfer-baseline: the source run's fitted baselines. A feature the external cohort
   never measured is never imputed from the source cohort: the model is skipped with the
   reason, or with `shared_features_only` refitted on the source training split with the
   features both cohorts have, as `<model>-shared`, whose in-distribution row is that
   refit on the source test split.
4. diagnose-student-<kind>: the source run's exported students (`students`).
5. diagnose: the teacher, few-shot with exemplars from the source run's training split
   (`teacher`), where the source run has a teacher diagnosis.
6. transfer-report: per model, in-distribution (the source run's test split) and
   external metrics side by side with bootstrap CIs (`bootstrap`, `seed`):
   reports/transfer/transfer.json and transfer.html. Like `radiag evaluate`, changed
   predictions re-derive the report; another report config is refused unless `fresh`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from functools import partial
from pathlib import Path
from string import Template
from typing import Any, get_args

from pydantic import Field, model_validator

from radiag.baseline import (
    BASELINE_MODELS,
    BASELINE_STAGE,
    FEATURE_SETS,
    TEST_TABLE,
    fit_baseline,
    load_baseline,
    predict_columns,
    read_split,
    training_rows,
    unmeasured_columns,
)
from radiag.cohort.describe import DescribeConfig
from radiag.cohort.split import SPLITS, SplitConfig
from radiag.cohort.stages import (
    NORM_FILE,
    SPLITS_STAGE,
    IngestConfig,
    describe_and_split,
    ingest,
    run_norm,
)
from radiag.config import ConfigError, StrictModel, load_config
from radiag.contract import (
    Stage,
    StageIdentity,
    StageSummary,
    finished_upstream,
    read_record,
    run_stage,
    upstream,
)
from radiag.evaluation.metrics import evaluate_model, subject_of
from radiag.evaluation.predictions import load_model, model_names, test_labels
from radiag.evaluation.report.markup import escape, fmt, html_table, td, with_ci
from radiag.outputs import predictions_dir, write_part
from radiag.pipeline import RayConfig, RunConfig
from radiag.store import RunStore
from radiag.students.config import StudentDiagnoseConfig, StudentKind, student_diagnose_stage
from radiag.students.config import model_name as student_name
from radiag.teacher.stages import DIAGNOSE_STAGE, DiagnoseConfig, teacher_stage

EXTERNAL_SPLIT = SplitConfig(train=0, val=0, test=1, visits="baseline")
"""Every external subject is test, one visit each: nothing of the other cohort is trained on."""
SHARED = "-shared"  # suffix of a baseline refitted on the features both cohorts measure
SOURCE_TEST = "source-test"  # <external run>/source-test/predictions/<model>-shared/: its
# predictions of the source test split, the in-distribution row of a refit
REPORT_DIR = "reports/transfer"
STUDENTS: dict[str, StudentKind] = {student_name(k): k for k in get_args(StudentKind)}
STUDENT_STAGES = [student_diagnose_stage(kind) for kind in STUDENTS.values()]
TRANSFER_BASELINE_STAGE = Stage(
    "transfer-baseline",
    "baselines",
    also=(
        *BASELINE_STAGE.also,
        *(predictions_dir(name + SHARED) for name in BASELINE_MODELS),
        *(f"{SOURCE_TEST}/{predictions_dir(name + SHARED)}" for name in BASELINE_MODELS),
    ),
)
REPORT_STAGE = Stage("transfer-report", REPORT_DIR)


class TransferError(ConfigError):
    """A transfer that cannot be evaluated honestly as configured; the message is user-facing."""


class TransferConfig(StrictModel):
    """Cross-cohort evaluation of a trained run (see the module docstring for each stage).

    `transfer_config` fills `describe`, `students` and `teacher` from the source run's
    stage records, so the external cohort is described and diagnosed as the source test
    split was; the fields that only schedule work (replicas, batch sizes, an endpoint's
    key variable) are not recorded and start at their defaults.
    """

    run_dir: str = Field(description="the external run: its own directory, local or s3://")
    source_run: str = Field(description="the trained run whose models are carried over")
    cohort: IngestConfig = Field(description="the other cohort (source, path, mapping)")
    describe: DescribeConfig = Field(description="how the external cohort is described")
    models: list[str] | None = Field(
        None, description="models to transfer (teacher, student-text, baseline-...); null: all"
    )
    shared_features_only: bool = Field(
        False,
        description="refit a baseline whose features the external cohort lacks on the shared "
        "ones (as <model>-shared); false skips it",
    )
    students: StudentDiagnoseConfig = Field(default_factory=StudentDiagnoseConfig)
    teacher: DiagnoseConfig | None = Field(
        None, description="the teacher's few-shot diagnosis; null: the source run has none"
    )
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the 95% CIs")
    seed: int = 0
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _diagnoses_the_test_split(self) -> TransferConfig:
        if self.students.split != "test" or (self.teacher and self.teacher.split != "test"):
            raise ValueError("students.split and teacher.split must be test: all of it is test")
        return self

    def run_config(self) -> RunConfig:
        """These settings as a run config, for the preflight of what the transfer reads."""
        teacher = self.models is None or "teacher" in self.models
        return RunConfig(
            run_dir=self.run_dir,
            cohort=self.cohort,
            diagnose=self.teacher if teacher else None,
            ray=self.ray,
        )


def transfer_config(
    source_run: str, cohort: str | Path, run_dir: str, overrides: list[str] | None = None
) -> TransferConfig:
    """The transfer of `source_run`'s models to the cohort of the ingest YAML `cohort`,
    described and diagnosed with the source run's recorded settings, then `overrides`.

    Raises:
        ConfigError: the cohort YAML or an override is invalid (a `TransferError`: the
            source run has no finished splits stage).
    """
    source = RunStore(source_run)
    splits = read_record(source, SPLITS_STAGE)
    if splits is None or splits.summary is None:
        raise TransferError(f"{source.uri} has no finished splits stage: is it a trained run?")
    describe = dict(splits.identity.config["describe"])
    if source.exists(NORM_FILE):  # the norm the source graded with, whichever kind it was
        describe["norm"] = source.uri_of(NORM_FILE)
    base: dict[str, Any] = {
        "run_dir": run_dir,
        "source_run": source_run,
        "cohort": load_config(IngestConfig, cohort).model_dump(mode="json"),
        "describe": describe,
    }
    recorded = [read_record(source, stage) for stage in STUDENT_STAGES]
    if students := [r.identity.config for r in recorded if r is not None]:
        base["students"] = dict(students[0])
    if teacher := read_record(source, DIAGNOSE_STAGE):
        base["teacher"] = dict(teacher.identity.config)
    return load_config(TransferConfig, overrides=overrides, base=base)


Step = Callable[[RunStore, bool], StageSummary]  # (external store, fresh) -> what it did


def transfer_stages(cfg: TransferConfig, models: list[str]) -> list[tuple[str, Step]]:
    """The external run's stages, in order, for the chosen source `models`."""
    from radiag.students.predict import run_student_diagnose  # torch, for the students only

    source = RunStore(cfg.source_run)
    stages: list[tuple[str, Step]] = [
        ("cohort", partial(ingest, cfg.cohort)),
        ("splits", partial(external_splits, cfg.describe, source)),
    ]
    if baselines := [m for m in models if m in BASELINE_MODELS]:
        step = partial(transfer_baselines, baselines, cfg.shared_features_only, source)
        stages.append(("transfer-baseline", step))
    for name in models:
        if name in STUDENTS:
            step = partial(run_student_diagnose, STUDENTS[name], cfg.students, models=source)
            stages.append((f"diagnose-{name}", step))
    if "teacher" in models:
        stages.append(
            ("diagnose", partial(teacher_stage, "diagnose", cfg.teacher, exemplars=source))
        )
    stages.append(("transfer-report", partial(transfer_report, cfg, models, source)))
    return stages


def run(
    cfg: TransferConfig,
    fresh: bool = False,
    on_stage: Callable[[str], None] = lambda _: None,
    on_done: Callable[[StageSummary], None] = lambda _: None,
) -> dict[str, StageSummary]:
    """Run every transfer stage in order; returns the summary of each.

    Raises:
        TransferError: the external run is the source run, or a model cannot be transferred.
    """
    store, source = RunStore(cfg.run_dir), RunStore(cfg.source_run)
    if store.uri == source.uri:
        raise TransferError(f"run_dir {store.uri} is the source run: give the external run its own")
    done: dict[str, StageSummary] = {}
    for name, stage in transfer_stages(cfg, _chosen_models(cfg, source)):
        on_stage(name)
        done[name] = stage(store, fresh)
        on_done(done[name])
    return done


def _chosen_models(cfg: TransferConfig, source: RunStore) -> list[str]:
    """`cfg.models`, or every model with predictions in the source run (its in-distribution row)."""
    available = model_names(source)
    chosen = cfg.models if cfg.models is not None else available
    if unknown := [m for m in chosen if m not in available]:
        raise TransferError(
            f"models {unknown}: no predictions in {source.uri_of('predictions')} "
            f"(it has {available}), so there is no in-distribution row to compare with"
        )
    known = {"teacher", *STUDENTS, *BASELINE_MODELS}
    if odd := [m for m in chosen if m not in known]:
        raise TransferError(f"models {odd}: not a teacher, student or baseline of a run")
    if "teacher" in chosen and cfg.teacher is None:
        raise TransferError("model teacher: set teacher (the source run recorded no diagnosis)")
    return chosen


def external_splits(
    describe_cfg: DescribeConfig, source: RunStore, store: RunStore, fresh: bool = False
) -> StageSummary:
    """The other cohort described and all in test, checked to share no subject with `source`."""
    summary = describe_and_split(describe_cfg, EXTERNAL_SPLIT, store, fresh)
    seen = {subject_of(p) for split in SPLITS for p in _patients(source, split)}
    if shared := sorted(seen & {subject_of(p) for p in _patients(store, "test")}):
        raise TransferError(
            f"{len(shared)} subjects of {store.uri} are subjects of the source run {source.uri} "
            f"(e.g. {', '.join(shared[:3])}): its models have seen them. Patient ids are "
            "<source>-<RID>-<VISCODE>: another cohort's mapping needs its own source name"
        )
    return summary


def _patients(store: RunStore, split: str) -> list[str]:
    return store.read_table(f"splits/{split}.parquet")["patient_id"].to_pylist()


def transfer_baselines(
    names: list[str], shared_only: bool, source: RunStore, store: RunStore, fresh: bool = False
) -> StageSummary:
    """The source run's baselines `names` on the external test split (module docstring, 3)."""
    identity = StageIdentity(
        stage="transfer-baseline",
        config={"models": names, "shared_features_only": shared_only},
        upstream=upstream(store, [SPLITS_STAGE]) | upstream(source, [BASELINE_STAGE]),
    )
    return run_stage(
        store,
        TRANSFER_BASELINE_STAGE,
        identity,
        lambda: _baselines(names, shared_only, source, store),
        fresh,
    )


def _baselines(
    names: list[str], shared_only: bool, source: RunStore, store: RunStore
) -> StageSummary:
    record = read_record(source, BASELINE_STAGE)
    assert record is not None  # upstream() has checked that it finished
    seed = int(record.identity.config["seed"])  # a refit is seeded as the source's fit was
    external = read_split(store, TEST_TABLE, {"patient_id"}.union(*FEATURE_SETS.values()))
    counts: dict[str, int] = {}
    details: dict[str, dict[str, Any]] = {}
    for name in names:
        pipeline, feature_set = load_baseline(source, name)
        features = list(FEATURE_SETS[feature_set])
        missing = unmeasured_columns(external, features)
        if missing and not shared_only:
            details[name] = {
                "missing": missing,
                "skipped": f"the external cohort never measures {', '.join(missing)} (not "
                "imputed from the source cohort); shared_features_only refits it without them",
            }
            continue
        evaluated = name + SHARED if missing else name
        if missing:
            features = [c for c in features if c not in missing]
            classifier, _ = BASELINE_MODELS[name]
            pipeline = fit_baseline(
                classifier, features, training_rows(source, set(features)), seed
            )
            source_test = read_split(source, TEST_TABLE, {"patient_id", *features})
            rows = predict_columns(evaluated, pipeline, features, source_test, seed)
            write_part(store, f"{SOURCE_TEST}/{predictions_dir(evaluated)}", rows)
        rows = predict_columns(evaluated, pipeline, features, external, seed)
        write_part(store, predictions_dir(evaluated), rows)
        counts[evaluated] = len(rows)
        details[name] = {"missing": missing, "evaluated_as": evaluated, "features": features}
    counts["skipped"] = sum("skipped" in d for d in details.values())
    return StageSummary(stage="transfer-baseline", counts=counts, details=details)


def transfer_report(
    cfg: TransferConfig, models: list[str], source: RunStore, store: RunStore, fresh: bool = False
) -> StageSummary:
    """In-distribution vs external metrics per model -> reports/transfer/ (module docstring, 6)."""
    predicted = [SPLITS_STAGE, DIAGNOSE_STAGE, *STUDENT_STAGES]
    outside = finished_upstream(source, [*predicted, BASELINE_STAGE])
    identity = StageIdentity(
        stage="transfer-report",
        config={"models": models, "bootstrap": cfg.bootstrap, "seed": cfg.seed},
        upstream=finished_upstream(store, [*predicted, TRANSFER_BASELINE_STAGE])
        | {f"source.{name}": value for name, value in outside.items()},
    )
    record = read_record(store, REPORT_STAGE)
    same_config = record is not None and record.identity.config == identity.config
    return run_stage(
        store,
        REPORT_STAGE,
        identity,
        lambda: _report(cfg, models, source, store),
        fresh or same_config,
    )


def _report(
    cfg: TransferConfig, models: list[str], source: RunStore, store: RunStore
) -> StageSummary:
    record = read_record(store, TRANSFER_BASELINE_STAGE)
    baselines: dict[str, Any] = record.summary.details if record and record.summary else {}
    refits = RunStore(store.uri_of(SOURCE_TEST))
    sides = {
        "in-distribution": (set(_patients(source, "test")), test_labels(source)),
        "external": (set(_patients(store, "test")), test_labels(store)),
    }
    rows, problems, notes = [], [], []
    for name in models:
        moved = baselines.get(name, {})
        if "skipped" in moved:
            problems.append(f"{name}: {moved['skipped']}")
            continue
        evaluated = moved.get("evaluated_as", name)
        if evaluated != name:
            notes.append(
                f"{evaluated}: {name} refitted on the source training split without "
                f"{', '.join(moved['missing'])}, which the external cohort never measures"
            )
        stores = {"in-distribution": refits if evaluated != name else source, "external": store}
        for side, (ids, truth) in sides.items():
            predictions = load_model(stores[side], evaluated, ids)
            metrics = evaluate_model(evaluated, predictions, truth, cfg.bootstrap, cfg.seed).metrics
            rows.append({"cohort": side, **{k: _plain(v) for k, v in metrics.items()}})
    norm = run_norm(store, cfg.describe)
    report = {
        "source_run": source.uri,
        "external_run": store.uri,
        "cohort": cfg.cohort.model_dump(mode="json"),
        "norm": {"describe.norm": cfg.describe.norm, "kind": norm.kind, "method": norm.method},
        "metrics": rows,
        "notes": notes,
        "problems": problems,
    }
    store.write_json(f"{REPORT_DIR}/transfer.json", report)
    store.write_bytes(f"{REPORT_DIR}/transfer.html", _page(report).encode())
    return StageSummary(
        stage="transfer-report",
        counts={"models": len({r["model"] for r in rows}), "skipped": len(problems)},
        details={"report": store.uri_of(f"{REPORT_DIR}/transfer.html")} | report,
    )


def _plain(value: Any) -> Any:
    """A metric as JSON has it: NaN (not computable) as null, numpy numbers as Python's."""
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return None if math.isnan(value) else float(value)
    return value


def metric_cells(row: dict[str, Any]) -> list[str]:
    """One report row as text: model, cohort, n, coverage, then each score with its CI."""
    scores = [
        with_ci(row[s], row[f"{s}_lo"], row[f"{s}_hi"])
        for s in ("accuracy", "balanced_accuracy", "macro_f1")
    ]
    return [row["model"], row["cohort"], fmt(row["n"]), fmt(row["coverage"]), *scores]


METRIC_HEADER = ["model", "cohort", "n", "coverage", "accuracy", "balanced accuracy", "macro-F1"]

_PAGE = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>radiag transfer report</title>
<style>body{font:14px system-ui,sans-serif;margin:2em;max-width:70em}
table{border-collapse:collapse}th,td{padding:.3em .7em;border-bottom:1px solid #ddd;text-align:left}
.note{color:#555}.problem{color:#a00}</style></head>
<body><h1>Cross-cohort transfer</h1>
<p>Models of <code>$source</code> on the cohort of <code>$external</code>. In-distribution: the
source run's test split; external: every subject of the other cohort (baseline visits).
Scores with 95% subject-bootstrap CIs. MRI grades: $norm.</p>
$table$notes</body></html>
""")


def _page(report: dict[str, Any]) -> str:
    """The report as one small self-contained HTML page."""
    rows = [[td(cell) for cell in metric_cells(row)] for row in report["metrics"]]
    notes = [f'<p class="note">{escape(n)}</p>' for n in report["notes"]]
    notes += [f'<p class="problem">not transferred: {escape(p)}</p>' for p in report["problems"]]
    norm = report["norm"]
    return _PAGE.substitute(
        source=escape(report["source_run"]),
        external=escape(report["external_run"]),
        norm=escape(
            f"{norm['kind']} norm ({norm['method']}; describe.norm {norm['describe.norm']})"
        ),
        table=html_table([escape(h) for h in METRIC_HEADER], rows),
        notes="".join(notes),
    )
