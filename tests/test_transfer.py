"""`radiag transfer`: a trained run's models diagnose another cohort, and the report sets
in-distribution and external metrics side by side.

Slow: the source run trains a tiny text student (Ray Train) and every model diagnoses
with Ray Data actors. The teacher is an OpenAI-compatible stub (its stages are tested
with a real engine in tests/teacher). The external cohort is a synthetic site
(`radiag.cohort.synthetic.SiteConfig`): AIBL's group mix and ages, volumes measured on
another scale, and three regions it never measures.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow.compute as pc
import pytest
import yaml
from typer.testing import CliRunner

from radiag.baseline import BaselineConfig, load_baseline, predict_rows, run_baseline
from radiag.cli import app
from radiag.cohort.describe import DescribeConfig
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
from radiag.cohort.synthetic import SynthConfig
from radiag.contract import read_record
from radiag.evaluation.predictions import test_labels
from radiag.outputs import read_parts
from radiag.store import RunStore
from radiag.students.config import StudentDiagnoseConfig, distill_stage, student_diagnose_stage
from radiag.students.distill import run_distill
from radiag.students.predict import read_fitted_offsets, run_student_diagnose
from radiag.teacher.engines import OpenAIEngineConfig
from radiag.teacher.exemplars import ExemplarConfig
from radiag.teacher.stages import DiagnoseConfig, teacher_stage
from radiag.transfer import REPORT_STAGE, TRANSFER_BASELINE_STAGE, run, transfer_config

pytestmark = pytest.mark.slow

TABULAR = "baseline-logistic-tabular"
COGNITION = "baseline-logistic-tabular_cognition"
UNMEASURED = ["Entorhinal", "Fusiform", "MidTemp"]  # by the site; both baselines use them
FINISHED_ONCE = ("cohort", "splits", "baselines", "reports/transfer")  # not resumable stages


@pytest.fixture(scope="module")
def source(
    tmp_path_factory: pytest.TempPathFactory,
    ray_cluster: None,
    write_rationales: Callable[[RunStore], None],
    tiny_student: Callable,
    stub_teacher: str,
) -> RunStore:
    """A trained run: baselines, a tiny text student and the teacher, each with its test
    split predictions (the in-distribution rows)."""
    store = RunStore(str(tmp_path_factory.mktemp("transfer") / "source"))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=120, max_visits=1)), store)
    describe_and_split(DescribeConfig(norm="fitted"), SplitConfig(), store)  # its own CN norm
    baselines = BaselineConfig(
        classifiers=["logistic"], feature_sets=["tabular", "tabular_cognition"]
    )
    run_baseline(baselines, store)
    write_rationales(store)
    run_distill("text", tiny_student(loss="rationale_label", optim={"max_steps": 2}), store)
    # Answers chosen with offsets fitted on its val split: the transfer carries them over.
    diagnose = StudentDiagnoseConfig(max_new_tokens=8, decision="validation")
    run_student_diagnose("text", diagnose, store)
    teacher = DiagnoseConfig(
        engine=OpenAIEngineConfig(base_url=stub_teacher, model="stub"),
        exemplars=ExemplarConfig(strategy="fixed"),
    )
    teacher_stage("diagnose", teacher, store)
    return store


def write_cohort(path: Path, **site: object) -> Path:
    """An ingest config of 24 subjects of another synthetic site (`site`: its settings)."""
    synthetic = {"subjects": 24, "max_visits": 2, "seed": 7, "site": site}
    path.write_text(yaml.safe_dump({"source": "synthetic", "synthetic": synthetic}))
    return path


@pytest.fixture(scope="module")
def cohort_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("site2") / "cohort.yaml")


@pytest.fixture(scope="module")
def external(
    source: RunStore, cohort_yaml: Path, tmp_path_factory: pytest.TempPathFactory
) -> RunStore:
    """The transfer, as a user runs it."""
    run_dir = tmp_path_factory.mktemp("transfer") / "site2"
    result = CliRunner().invoke(
        app,
        ["transfer", "--from", source.uri, "--cohort", str(cohort_yaml), "--run", str(run_dir),
         "--set", "shared_features_only=true", "--set", "bootstrap=200"],
        terminal_width=200,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "in-distribution vs external" in result.output and "Entorhinal" in result.output
    return RunStore(str(run_dir))


def _ids(store: RunStore, split: str) -> set[str]:
    return set(store.read_table(f"splits/{split}.parquet")["patient_id"].to_pylist())


def _report(store: RunStore) -> dict:
    return store.read_json("reports/transfer/transfer.json")


def test_every_external_subject_is_test_and_none_is_a_source_subject(
    source: RunStore, external: RunStore
) -> None:
    assignment = external.read_table("splits/assignment.parquet").to_pandas()
    subjects = pc.unique(external.read_table("cohort/cohort.parquet")["RID"])
    assert set(assignment["split"]) == {"test"} and len(assignment) == len(subjects) > 0
    assert not _ids(external, "train") and not _ids(external, "val")
    test = external.read_table("splits/test.parquet").to_pandas()
    assert (test["VISCODE"] == "bl").all() and test["RID"].is_unique  # one visit per subject
    assert all(pid.startswith("site2-") for pid in test["patient_id"])
    source_ids = set().union(*(_ids(source, split) for split in ("train", "val", "test")))
    assert not source_ids & set(test["patient_id"])


def test_a_cohort_sharing_subjects_with_the_source_run_is_refused(
    source: RunStore, tmp_path: Path
) -> None:
    """The source run's own cohort again: its models have seen every one of these subjects."""
    own = tmp_path / "own.yaml"
    own.write_text(
        yaml.safe_dump({"source": "synthetic", "synthetic": {"subjects": 120, "max_visits": 1}})
    )
    result = CliRunner().invoke(
        app,
        ["transfer", "--from", source.uri, "--cohort", str(own), "--run", str(tmp_path / "own"),
         "--set", f"models=[{TABULAR}]"],
        terminal_width=300,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "are subjects of the source run" in result.output
    assert not (tmp_path / "own" / "baselines").exists()  # no model ran on them


def test_the_external_cohort_is_graded_with_the_source_runs_norm(
    source: RunStore, external: RunStore
) -> None:
    fitted = source.read_json("splits/norm.json")
    assert fitted["kind"] == "fitted" and external.read_json("splits/norm.json") == fitted
    assert _report(external)["norm"]["describe.norm"] == source.uri_of("splits/norm.json")


def test_a_baseline_missing_features_is_refit_on_the_shared_ones_which_are_named(
    source: RunStore, external: RunStore
) -> None:
    details = read_record(external, TRANSFER_BASELINE_STAGE).summary.details
    for name in (TABULAR, COGNITION):
        refit = details[name]
        assert refit["missing"] == UNMEASURED and refit["evaluated_as"] == f"{name}-shared"
        assert not set(UNMEASURED) & set(refit["features"])
        assert {"Hippocampus", "ICV"} <= set(refit["features"])
        # Its in-distribution row is the refit itself on the source test split.
        refit_source = read_parts(external, f"source-test/predictions/{name}-shared")
        assert set(refit_source["patient_id"].to_pylist()) == _ids(source, "test")
    notes = _report(external)["notes"]
    assert all(any(n.startswith(f"{name}-shared") and "MidTemp" in n for n in notes)
               for name in (TABULAR, COGNITION))  # fmt: skip


def test_without_shared_features_only_that_baseline_is_skipped_with_the_reason(
    source: RunStore, cohort_yaml: Path, tmp_path: Path
) -> None:
    cfg = transfer_config(source.uri, cohort_yaml, str(tmp_path / "site2"), [f"models=[{TABULAR}]"])
    done = run(cfg)

    skipped = done["transfer-baseline"].details[TABULAR]
    assert "Entorhinal, Fusiform, MidTemp" in skipped["skipped"] and "evaluated_as" not in skipped
    store = RunStore(cfg.run_dir)
    assert not store.exists(f"predictions/{TABULAR}")
    report = _report(store)
    assert report["metrics"] == [] and report["problems"][0].startswith(TABULAR)


def test_a_baseline_whose_features_the_site_all_measures_is_carried_over_unchanged(
    source: RunStore, tmp_path: Path
) -> None:
    cohort = write_cohort(tmp_path / "cohort.yaml", missing_regions=[])
    cfg = transfer_config(source.uri, cohort, str(tmp_path / "site2"), [f"models=[{TABULAR}]"])
    run(cfg)

    store = RunStore(cfg.run_dir)
    assert read_record(store, TRANSFER_BASELINE_STAGE).summary.details[TABULAR]["missing"] == []
    predicted = read_parts(store, f"predictions/{TABULAR}").to_pandas().set_index("patient_id")
    pipeline, feature_set = load_baseline(source, TABULAR)  # the source run's fitted model
    test = store.read_table("splits/test.parquet").to_pandas()
    expected = pd.DataFrame(predict_rows(TABULAR, pipeline, feature_set, test)).set_index(
        "patient_id"
    )
    pd.testing.assert_series_equal(predicted["p_AD"].sort_index(), expected["p_AD"].sort_index())
    assert {row["cohort"] for row in _report(store)["metrics"]} == {"in-distribution", "external"}


def test_the_student_and_the_teacher_diagnose_every_external_patient_with_source_models(
    source: RunStore, external: RunStore
) -> None:
    test_ids = _ids(external, "test")
    student = read_parts(external, "predictions/student-text")
    assert set(student["patient_id"].to_pylist()) == test_ids
    assert pc.all(pc.is_null(student["error"])).as_py()
    upstream = read_record(external, student_diagnose_stage("text")).identity.upstream
    assert upstream["distill-text"] == read_record(source, distill_stage("text")).output_digest
    # Decided with the source's val-split offsets: the external cohort has no val split.
    fitted = read_record(source, student_diagnose_stage("text"))
    assert upstream["diagnose-student-text"] == fitted.output_digest
    offsets = read_fitted_offsets(source, "text")
    assert all(json.loads(s)["offsets"] == offsets for s in student["sampling"].to_pylist())
    teacher = read_parts(external, "predictions/teacher")
    assert set(teacher["patient_id"].to_pylist()) == test_ids
    exemplars = set().union(*teacher["exemplar_ids"].to_pylist())
    assert exemplars and exemplars <= _ids(source, "train")  # never an external patient


def test_the_report_has_in_distribution_and_external_rows_per_model_with_cis(
    source: RunStore, external: RunStore
) -> None:
    metrics = pd.DataFrame(_report(external)["metrics"])
    models = {"teacher", "student-text", f"{TABULAR}-shared", f"{COGNITION}-shared"}
    assert set(metrics["model"]) == models
    assert len(metrics) == 2 * len(models)
    for cohort, store in (("in-distribution", source), ("external", external)):
        rows = metrics[metrics["cohort"] == cohort]
        assert set(rows["model"]) == models
        assert (rows["n"] == len(test_labels(store))).all()  # every labelled test patient
        for score in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert (rows[f"{score}_lo"] <= rows[score]).all()
            assert (rows[score] <= rows[f"{score}_hi"]).all()
    page = external.read_bytes("reports/transfer/transfer.html").decode()
    assert all(model in page for model in models) and "in-distribution" in page


def test_a_rerun_skips_every_finished_stage(
    source: RunStore, external: RunStore, cohort_yaml: Path
) -> None:
    records = {d: Path(external.path(f"{d}/stage.json")).stat().st_mtime_ns for d in FINISHED_ONCE}
    cfg = transfer_config(
        source.uri, cohort_yaml, external.uri, ["shared_features_only=true", "bootstrap=200"]
    )
    done = run(cfg)

    assert {
        d: Path(external.path(f"{d}/stage.json")).stat().st_mtime_ns for d in FINISHED_ONCE
    } == records
    assert done["diagnose-student-text"].counts["generated_now"] == 0
    assert done["diagnose"].counts["generated_now"] == 0
    assert read_record(external, REPORT_STAGE).status == "complete"
