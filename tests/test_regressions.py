"""Regressions: one test per way the old main mixed, reused or silently replaced outputs.

The stage functions are called as `radiag run` calls them. Only their bodies (engines,
Ray Train, Ray Data predictors) are replaced by fakes that write real output rows, since
every identity decision is taken before a body starts.
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path
from typing import Any

import pytest

from radiag.baseline import BASELINE_STAGE, BaselineConfig, model_name, run_baseline
from radiag.cohort.describe import DescribeConfig
from radiag.cohort.split import SplitConfig, first_patients
from radiag.cohort.stages import (
    COHORT_STAGE,
    COHORT_TABLE,
    IngestConfig,
    describe_and_split,
    ingest,
)
from radiag.cohort.synthetic import SynthConfig
from radiag.contract import Stage, StageConflict, StageIdentity, StageSummary, read_record
from radiag.outputs import failure_counts, predictions_dir, read_parts, still_to_do, write_part
from radiag.store import RunStore
from radiag.students.config import DistillConfig, StudentDiagnoseConfig
from radiag.students.distill import run_distill
from radiag.students.predict import run_student_diagnose
from radiag.teacher.engines import OpenAIEngineConfig, SamplingConfig
from radiag.teacher.stages import (
    DiagnoseConfig,
    RationalizeConfig,
    TeacherSummary,
    output_dir,
    read_output,
    teacher_stage,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
STUDENT_PREDICTIONS = Stage("diagnose-student-text", predictions_dir("student-text"))


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


class FakeTeacher:
    """Stands in for `run_teacher`: one row per patient still to do, stamped with the config.

    Patients in `failing` fail transiently (an HTTP 503) and are retried by the next run.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.failing: set[str] = set()

    def __call__(
        self,
        task: str,
        cfg: RationalizeConfig | DiagnoseConfig,
        store: RunStore,
        exemplars: RunStore | None = None,
    ) -> TeacherSummary:
        self.calls += 1
        inputs = first_patients(store.read_table(f"splits/{cfg.split}.parquet"), cfg.limit)
        todo = still_to_do(inputs, read_output(store, task)).to_pylist()
        rows = [self._row(task, cfg, r["patient_id"]) for r in todo]
        if rows:
            write_part(store, output_dir(task), rows)
        output = read_output(store, task)
        return TeacherSummary(
            stage=task,
            rows=output.num_rows,
            generated_now=len(rows),
            retried=0,
            skipped_done=len(inputs) - len(rows),
            **failure_counts(output),
            qc_flagged=0,
            output_tokens_now=0,
            seconds=0.0,
        )

    def _row(self, task: str, cfg: RationalizeConfig | DiagnoseConfig, pid: str) -> dict[str, Any]:
        failed = pid in self.failing
        return {
            "patient_id": pid,
            "task": task,
            "engine": "openai",
            "model": cfg.engine.model,
            "sampling": cfg.sampling.model_dump_json(),
            "seed": cfg.sampling.seed,
            "rationale": None if failed else "Memory is preserved.",
            "diagnosis": None if failed else "CN",
            "error": "HTTP 503" if failed else None,
            "transient": failed,
            "created_at": now(),
        }


class FakeDistill:
    """Stands in for Ray Train: exports a `student.json` that names the identity it was trained for."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(
        self, kind: str, cfg: DistillConfig, store: RunStore, identity: StageIdentity
    ) -> StageSummary:
        self.calls += 1
        provenance = {"config": cfg.model_dump(mode="json"), "identity": identity.fingerprint}
        store.write_json(f"checkpoints/{kind}/final/student.json", provenance)
        return StageSummary(
            stage=f"distill-{kind}", counts={"examples": len(read_output(store, "rationalize"))}
        )


class FakePredictor:
    """Stands in for the Ray Data predictors: each row's rationale names the student that wrote it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(
        self,
        kind: str,
        cfg: StudentDiagnoseConfig,
        store: RunStore,
        models: RunStore,
        trained: DistillConfig,
    ) -> StageSummary:
        self.calls += 1
        student = models.read_json(f"checkpoints/{kind}/final/student.json")["identity"]
        test = first_patients(store.read_table(f"splits/{cfg.split}.parquet"), cfg.limit)
        rows = [
            {"patient_id": pid, "model": f"student-{kind}", "rationale": f"by {student}",
             "diagnosis": "MCI", "created_at": now()}
            for pid in test["patient_id"].to_pylist()
        ]  # fmt: skip
        write_part(store, predictions_dir(f"student-{kind}"), rows)
        return StageSummary(stage=f"diagnose-student-{kind}", counts={"rows": len(rows)})


@pytest.fixture(scope="module")
def split_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with a finished cohort and splits (80 synthetic subjects, one visit each)."""
    root = tmp_path_factory.mktemp("regressions") / "run"
    store = RunStore(str(root))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=80, max_visits=1)), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    return root


@pytest.fixture
def store(split_run: Path, tmp_path: Path) -> RunStore:
    shutil.copytree(split_run, tmp_path / "run")
    return RunStore(str(tmp_path / "run"))


@pytest.fixture
def teacher(monkeypatch: pytest.MonkeyPatch) -> FakeTeacher:
    fake = FakeTeacher()
    monkeypatch.setattr("radiag.teacher.stages.run_teacher", fake)
    return fake


@pytest.fixture
def distill(monkeypatch: pytest.MonkeyPatch) -> FakeDistill:
    fake = FakeDistill()
    monkeypatch.setattr("radiag.students.distill._distill", fake)
    return fake


@pytest.fixture
def predictor(monkeypatch: pytest.MonkeyPatch) -> FakePredictor:
    fake = FakePredictor()
    monkeypatch.setattr("radiag.students.predict._diagnose_all", fake)
    return fake


def engine(model: str = "teacher-a") -> OpenAIEngineConfig:
    return OpenAIEngineConfig(base_url="http://127.0.0.1:9/v1", model=model)


def rationalize_cfg(**changes: Any) -> RationalizeConfig:
    return RationalizeConfig(engine=engine(), limit=6).model_copy(update=changes)


def diagnose_cfg(**changes: Any) -> DiagnoseConfig:
    return DiagnoseConfig(engine=engine(), limit=4).model_copy(update=changes)


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        ({"sampling": SamplingConfig(seed=7)}, "config.sampling.seed"),
        ({"engine": engine("teacher-b")}, "files.model"),
    ],
    ids=["sampling", "model"],
)
def test_rationalize_with_another_sampling_or_model_is_refused_not_appended(
    store: RunStore, teacher: FakeTeacher, changed: dict[str, Any], named: str
) -> None:
    """Old main: `rationalize` generated only the patients missing from rationales/, so a
    new sampling or model appended its rows to the old ones: one table, two identities."""
    teacher_stage("rationalize", rationalize_cfg(), store)
    before = read_output(store, "rationalize")
    with pytest.raises(StageConflict, match="--fresh") as refused:
        teacher_stage("rationalize", rationalize_cfg(limit=10, **changed), store)
    assert named in str(refused.value)
    assert teacher.calls == 1
    assert read_output(store, "rationalize").equals(before)


def test_teacher_diagnose_with_another_model_is_refused_not_appended(
    store: RunStore, teacher: FakeTeacher
) -> None:
    """Old main: `diagnose` added the new model's answers to the old model's in predictions/teacher/."""
    teacher_stage("rationalize", rationalize_cfg(), store)
    teacher_stage("diagnose", diagnose_cfg(), store)
    with pytest.raises(StageConflict, match="--fresh") as refused:
        teacher_stage("diagnose", diagnose_cfg(engine=engine("teacher-b"), limit=8), store)
    assert "files.model" in str(refused.value) and "config.engine.model" in str(refused.value)
    assert teacher.calls == 2
    table = read_output(store, "diagnose")
    assert table.num_rows == 4 and set(table["model"].to_pylist()) == {"teacher-a"}


def test_a_retrained_student_does_not_keep_the_old_students_predictions(
    store: RunStore, teacher: FakeTeacher, distill: FakeDistill, predictor: FakePredictor
) -> None:
    """Old main: `diagnose --model text` skipped every patient already predicted, so after
    a retrain it returned the old student's rows as the new student's."""
    teacher_stage("rationalize", rationalize_cfg(), store)
    run_distill("text", DistillConfig(), store)
    diagnose = StudentDiagnoseConfig(limit=5)
    run_student_diagnose("text", diagnose, store)
    old_student = store.read_json("checkpoints/text/final/student.json")["identity"]
    old_predictions = read_record(store, STUDENT_PREDICTIONS)
    assert old_predictions is not None

    run_distill("text", DistillConfig(seed=1), store, fresh=True)
    new_student = store.read_json("checkpoints/text/final/student.json")["identity"]
    assert new_student != old_student
    with pytest.raises(StageConflict, match="--fresh") as refused:
        run_student_diagnose("text", diagnose, store)
    assert "upstream.distill-text" in str(refused.value)
    assert predictor.calls == 1
    assert by_student(store, "predictions/student-text") == [f"by {old_student}"] * 5

    run_student_diagnose("text", diagnose, store, fresh=True)
    assert by_student(store, "predictions/student-text") == [f"by {new_student}"] * 5
    aside = f"superseded/diagnose-student-text-{old_predictions.fingerprint}"
    assert by_student(store, f"{aside}/predictions/student-text") == [f"by {old_student}"] * 5


def by_student(store: RunStore, directory: str) -> list[str]:
    return read_parts(store, directory)["rationale"].to_pylist()


def first_train_patients(store: RunStore, limit: int) -> list[str]:
    return first_patients(store.read_table("splits/train.parquet"), limit)["patient_id"].to_pylist()


def test_distill_is_not_skipped_after_the_rationales_grew(
    store: RunStore, teacher: FakeTeacher, distill: FakeDistill
) -> None:
    """Old main: distill's fingerprint was its own config, so once rationalize had added
    rows (a retried failure, a larger limit) distill was skipped: the student never saw them."""
    teacher.failing = set(first_train_patients(store, 1))
    teacher_stage("rationalize", rationalize_cfg(), store)
    run_distill("text", DistillConfig(), store)
    teacher.failing = set()
    grown = teacher_stage("rationalize", rationalize_cfg(limit=10), store)
    assert grown.counts["rows"] == 10 and grown.counts["retry_pending"] == 0
    with pytest.raises(StageConflict, match="--fresh") as refused:
        run_distill("text", DistillConfig(), store)
    assert "changed: upstream.rationalize." in str(refused.value)
    assert distill.calls == 1


def test_a_larger_rationalize_limit_grows_finished_rationales_and_distill_is_then_refused(
    store: RunStore, teacher: FakeTeacher, distill: FakeDistill
) -> None:
    """`limit` is a scheduling field ("a larger limit resumes"): a finished rationalize run
    with a larger limit must add the missing rows, not return the stored summary."""
    teacher_stage("rationalize", rationalize_cfg(), store)
    run_distill("text", DistillConfig(), store)
    teacher_stage("rationalize", rationalize_cfg(limit=10), store)
    assert read_output(store, "rationalize").num_rows == 10
    with pytest.raises(StageConflict, match=r"changed: upstream\.rationalize\."):
        run_distill("text", DistillConfig(), store)
    assert distill.calls == 1


@pytest.fixture
def clinic(tmp_path: Path) -> IngestConfig:
    """A memory clinic's CSV with its column-mapping YAML, both copies we may edit."""
    csv, mapping = tmp_path / "memoryclinic.csv", tmp_path / "mapping.yaml"
    shutil.copy(FIXTURES / "memoryclinic.csv", csv)
    shutil.copy(ROOT / "configs" / "mappings" / "example.yaml", mapping)
    return IngestConfig(source="csv", path=str(csv), mapping=str(mapping))


def cohort_value(store: RunStore, table: str, patient_id: str, column: str) -> Any:
    rows = store.read_table(table).to_pylist()
    return next(row[column] for row in rows if row["patient_id"] == patient_id)


def edit(path: Path, old: bytes, new: bytes) -> None:
    content = path.read_bytes()
    assert content.count(old) == 1
    path.write_bytes(content.replace(old, new))


@pytest.mark.parametrize(
    ("file", "old", "new", "column", "before", "after"),
    [
        ("path", b",22,", b",21,", "MMSE", 22, 21),  # one byte of the CSV
        ("mapping", b"AD: AD}", b"AD: MCI}", "label", "AD", "MCI"),
    ],
    ids=["csv", "mapping"],
)
def test_ingest_does_not_reuse_the_cohort_after_its_source_file_changed(
    tmp_path: Path,
    clinic: IngestConfig,
    file: str,
    old: bytes,
    new: bytes,
    column: str,
    before: Any,
    after: Any,
) -> None:
    """Old main: ingest's fingerprint held the CSV and mapping *paths*, so after either
    file was edited in place ingest was skipped and the old cohort stayed."""
    store = RunStore(str(tmp_path / "run"))
    ingest(clinic, store)
    record = read_record(store, COHORT_STAGE)
    assert record is not None
    edited = Path(getattr(clinic, file))
    edit(edited, old, new)

    with pytest.raises(StageConflict, match="--fresh") as refused:
        ingest(clinic, store)
    assert f"changed: files.{edited.resolve()}." in str(refused.value)
    assert cohort_value(store, COHORT_TABLE, "memoryclinic-102-bl", column) == before

    ingest(clinic, store, fresh=True)
    assert cohort_value(store, COHORT_TABLE, "memoryclinic-102-bl", column) == after
    aside = f"superseded/cohort-{record.fingerprint}/{COHORT_TABLE}"
    assert cohort_value(store, aside, "memoryclinic-102-bl", column) == before


def test_a_baseline_with_another_config_is_refused_not_silently_replaced(store: RunStore) -> None:
    """Old main: another baseline config rewrote the predictions of the models it fitted
    and left the other models' predictions of the old config beside them."""
    logistic = BaselineConfig(classifiers=["logistic"], feature_sets=["tabular"])
    other = BaselineConfig(classifiers=["logistic"], feature_sets=["description"])
    old, new = model_name("logistic", "tabular"), model_name("logistic", "description")
    run_baseline(logistic, store)
    record = read_record(store, BASELINE_STAGE)
    assert record is not None
    written = read_parts(store, predictions_dir(old))

    with pytest.raises(StageConflict, match="--fresh") as refused:
        run_baseline(other, store)
    assert "changed: config.feature_sets." in str(refused.value)
    assert read_parts(store, predictions_dir(old)).equals(written)
    assert not store.exists(predictions_dir(new))

    run_baseline(other, store, fresh=True)
    assert not store.exists(predictions_dir(old))
    aside = f"superseded/baseline-{record.fingerprint}"
    assert read_parts(store, f"{aside}/{predictions_dir(old)}").equals(written)
    test_rows = store.read_table("splits/test.parquet").num_rows
    assert read_parts(store, predictions_dir(new)).num_rows == test_rows
