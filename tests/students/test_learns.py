"""A text student distilled on a demo-sized cohort diagnoses unseen subjects above chance.

The rationales here are NOT the teacher's (a teacher run is far too slow for CI): each
is a deterministic template that restates the patient's findings, written in the
rationales output shape. The student is the tiny random Llama, fully fine-tuned with
the `label` loss, whose answer term is what teaches it the diagnosis. Nothing about the
label reaches a prompt; it trains on the training split only and is scored on
subjects it never saw.

Measured on the 2-core AMD EPYC (avx512_bf16; the test trains in fp32): balanced accuracy
0.522, subject-bootstrap 95% CI 0.439-0.597 on 99 test visits; 141 s in all (150 steps at
lr 2e-3; 240 steps at lr 1e-3 took 191 s, and 120 steps at 1e-3 stayed at chance).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from radiag.cohort.describe import DescribeConfig
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
from radiag.cohort.synthetic import SynthConfig
from radiag.contract import StageIdentity, StageSummary, run_stage
from radiag.evaluation.metrics import evaluate_model
from radiag.evaluation.predictions import test_labels
from radiag.outputs import read_parts, write_part
from radiag.store import RunStore
from radiag.students.config import DistillConfig, StudentDiagnoseConfig
from radiag.students.distill import run_distill
from radiag.students.predict import run_student_diagnose
from radiag.teacher.stages import RATIONALIZE_STAGE

pytestmark = pytest.mark.slow
TEST_VISITS = 100
CHANCE = 1 / 3


def template_rationale(row: dict) -> str:
    """The findings restated, as a teacher would start its explanation."""
    apoe = "no APOE4 allele" if not row["APOE4"] else f"{row['APOE4']:.0f} APOE4 allele(s)"
    return (
        f"The MMSE is {row['MMSE']:.0f}/30 and the patient carries {apoe}. "
        f"Hippocampal atrophy: {row['grade_Hippocampus'] or 'not measured'}."
    )


def write_template_rationales(store: RunStore) -> None:
    """Recorded as a finished rationalize stage of a fixture identity, as conftest does."""
    identity = StageIdentity(stage="rationalize", config={"fixture": "test_learns template"})
    run_stage(store, RATIONALIZE_STAGE, identity, lambda: _write_rows(store))


def _write_rows(store: RunStore) -> StageSummary:
    train = store.read_table("splits/train.parquet").to_pylist()
    rows = [
        {"patient_id": row["patient_id"], "task": "rationalize", "label_shown": row["label"],
         "rationale": template_rationale(row), "diagnosis": row["label"], "qc_flagged": False}
        for row in train if row["label"]
    ]  # fmt: skip
    write_part(store, "rationales", rows)
    return StageSummary(stage="rationalize", counts={"rows": len(rows)})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> RunStore:
    """The demo config's cohort (400 subjects, up to 3 visits) with template rationales."""
    store = RunStore(str(tmp_path_factory.mktemp("learns") / "run"))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=400, max_visits=3, seed=0)), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    write_template_rationales(store)
    return store


def test_a_distilled_text_student_diagnoses_unseen_subjects_above_chance(
    demo_run: RunStore, tiny_model: Path, tiny_student: Callable[..., DistillConfig]
) -> None:
    cfg = tiny_student(
        loss="label", finetune="full", precision="fp32",
        optim={"lr": 2e-3, "epochs": 3, "max_steps": 150, "batch_size": 8}, checkpoint_every=150,
        scaling={"cpus_per_worker": 1, "threads_per_worker": 1},
    )  # fmt: skip
    run_distill("text", cfg, demo_run)
    diagnose = StudentDiagnoseConfig(limit=TEST_VISITS, batch_size=25, generate_rationale=False)
    run_student_diagnose("text", diagnose, demo_run)

    predictions = read_parts(demo_run, "predictions/student-text").to_pandas()
    # The report's own metrics: CIs resample subjects (with all their visits), not visits.
    scored = evaluate_model("student-text", predictions, test_labels(demo_run)).metrics
    print(f"balanced accuracy {scored['balanced_accuracy']:.3f} "
          f"(95% CI {scored['balanced_accuracy_lo']:.3f}-{scored['balanced_accuracy_hi']:.3f}), "
          f"n={scored['n']}")  # fmt: skip
    assert scored["n"] >= 60
    assert scored["balanced_accuracy_lo"] > CHANCE, scored
