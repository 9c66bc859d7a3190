"""A trained student diagnoses the test split in the teacher's table shape, with probabilities.

Slow: the session's trained run (its tiny text student), then predictor actors (Ray Data).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from radiag.cohort.schema import Label
from radiag.export import model_card
from radiag.outputs import OUTPUT_SCHEMA, PROBABILITY_COLUMNS, read_parts
from radiag.store import RunStore
from radiag.students.config import AnswerWithoutRationaleError, StudentDiagnoseConfig
from radiag.students.predict import (
    NoFittedDecisionError,
    NoTrainingMixError,
    StudentDiagnoser,
    download_student,
    fit_offsets,
    read_fitted_offsets,
    run_student_diagnose,
    training_prior,
)
from radiag.teacher.prompts import FINAL

pytestmark = pytest.mark.slow
ROWS = 6


@pytest.fixture(scope="module")
def trained(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> RunStore:
    """A copy of the session's trained run without its student predictions."""
    root = tmp_path_factory.mktemp("predict") / "run"
    shutil.copytree(trained_run, root, ignore=shutil.ignore_patterns("student-text"))
    return RunStore(str(root))


def test_predictions_have_the_shared_shape_and_probabilities_that_sum_to_one(
    trained: RunStore,
) -> None:
    cfg = StudentDiagnoseConfig(limit=ROWS, batch_size=3, max_new_tokens=12)
    summary = run_student_diagnose("text", cfg, trained)

    table = read_parts(trained, "predictions/student-text")
    assert table.schema == OUTPUT_SCHEMA
    assert summary.counts["rows"] == ROWS == table.num_rows
    rows = table.to_pylist()
    info = trained.read_json("checkpoints/text/final/student.json")
    prior = training_prior(info, "the trained student")
    for row in rows:
        probs = torch.tensor([row[PROBABILITY_COLUMNS[label]] for label in Label])
        assert float(probs.sum()) == pytest.approx(1.0, abs=1e-4)
        # Constrained, by default balanced: the greatest probability over its training share.
        assert row["diagnosis"] == list(Label)[int((probs / prior).argmax())]
        assert json.loads(row["sampling"])["decision"] == "balanced"
        assert row["model"] == "student-text" and row["engine"] == "transformers"
        assert row["dtype"] == cfg.resolved().dtype  # the precision this machine resolved
        assert row["rationale"] is not None and row["completion_tokens"] > 0
    test_ids = set(trained.read_table("splits/test.parquet")["patient_id"].to_pylist())
    assert {r["patient_id"] for r in rows} <= test_ids


def test_a_rerun_diagnoses_only_the_patients_not_done(trained: RunStore) -> None:
    # The same identity (a larger limit, another batch size: scheduling only) resumes.
    cfg = StudentDiagnoseConfig(limit=ROWS + 2, batch_size=4, max_new_tokens=12)
    summary = run_student_diagnose("text", cfg, trained)

    assert summary.counts["skipped_done"] == ROWS and summary.counts["generated_now"] == 2
    ids = read_parts(trained, "predictions/student-text")["patient_id"]
    assert len(ids) == ROWS + 2 == len(pc.unique(ids))


def test_most_probable_answers_the_plain_argmax(trained: RunStore) -> None:
    cfg = StudentDiagnoseConfig(limit=2, batch_size=2, max_new_tokens=8, decision="most_probable")
    run_student_diagnose("text", cfg, trained, fresh=True)  # another identity: old rows move aside

    for row in read_parts(trained, "predictions/student-text").to_pylist():
        probs = {label: row[PROBABILITY_COLUMNS[label]] for label in Label}
        assert row["diagnosis"] == max(probs, key=probs.get)
        assert json.loads(row["sampling"])["decision"] == "most_probable"


def test_a_validation_decision_is_fitted_on_the_val_split_and_decides_the_test_split(
    trained: RunStore,
) -> None:
    cfg = StudentDiagnoseConfig(limit=ROWS, batch_size=3, max_new_tokens=8, decision="validation")
    summary = run_student_diagnose("text", cfg, trained, fresh=True)

    # The val split is answered first, blind to its labels, in its own directory.
    validation = read_parts(trained, "predictions/student-text/validation")
    labels = dict(zip(*trained.read_table("splits/val.parquet").select(["patient_id", "label"]).to_pydict().values(), strict=True))  # fmt: skip
    assert validation.num_rows == min(ROWS, len(labels))
    assert set(validation["patient_id"].to_pylist()) <= set(labels)
    # The offsets are those that fit the val answers and labels best, and are recorded.
    rows = validation.to_pylist()
    probabilities = np.array([[r[PROBABILITY_COLUMNS[label]] for label in Label] for r in rows])
    offsets, accuracy = fit_offsets(probabilities, [labels[r["patient_id"]] for r in rows])
    fitted = trained.read_json("predictions/student-text/validation/decision.json")
    assert (fitted["offsets"], fitted["balanced_accuracy"]) == (offsets, round(accuracy, 4))
    assert summary.details["validation"] == fitted
    assert read_fitted_offsets(trained, "text") == offsets
    # The test split: the greatest log-probability plus its offset, the offsets in each row.
    test = read_parts(trained, "predictions/student-text").to_pylist()
    assert len(test) == ROWS and not {r["patient_id"] for r in test} & set(labels)
    for row in test:
        scores = {
            label: np.log(row[PROBABILITY_COLUMNS[label]]) + offsets[label] for label in Label
        }
        assert row["diagnosis"] == max(scores, key=scores.get)
        sampling = json.loads(row["sampling"])
        assert (sampling["decision"], sampling["offsets"]) == ("validation", offsets)
    # The exported student's card says how its answers were chosen, offsets and all.
    card = model_card(
        trained, "text", {"config": {}, "base_model": "m", "steps": 1, "examples": 1}, "x"
    )
    assert f"({json.dumps(offsets)}) (`decision: validation`)" in card
    # A student loaded (as Serve loads it) without the fit is refused with the way out.
    with pytest.raises(NoFittedDecisionError, match="val split"):
        StudentDiagnoser(download_student(trained, "text"), cfg)


def test_free_answers_are_parsed_and_unparsable_ones_stay_null(trained: RunStore) -> None:
    """Without the constraint the random tiny student rarely writes a final line: the
    diagnosis is then null with a reason, never guessed."""
    store = trained
    cfg = StudentDiagnoseConfig(limit=2, batch_size=2, max_new_tokens=8, constrain_answer=False)
    run_student_diagnose("text", cfg, store, fresh=True)  # another identity: old rows move aside

    for row in read_parts(store, "predictions/student-text").to_pylist():
        assert (row["diagnosis"] is None) == (row["parse_error"] is not None)
        assert row["p_AD"] is not None  # probabilities are still read from the logits
        assert json.loads(row["sampling"])["decision"] is None  # nothing was decided


def test_vllm_serves_the_exported_student(trained: RunStore) -> None:
    """The exported `lm/` is a plain HF directory: the teacher's vLLM engine loads it."""
    script = """
import sys
from radiag.students.formatting import student_messages
from radiag.teacher.engines import SamplingConfig, VllmEngineConfig
from radiag.teacher.vllm_engine import VllmEngine

engine = VllmEngine(VllmEngineConfig(
    model={"path": sys.argv[1]}, max_model_len=1024, cpu_kv_cache_gib=1, batch_size=2))
(done,) = engine.generate([student_messages("A 70-year-old man. MMSE 29.")],
                          SamplingConfig(temperature=1.0, max_tokens=8))
assert done.error is None and done.completion_tokens > 0, done
print("generated", done.completion_tokens)
"""
    lm = trained.path("checkpoints/text/final/lm")
    result = subprocess.run(
        [sys.executable, "-c", script, lm], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated" in result.stdout


def test_a_constrained_student_stops_generating_at_its_final_line(trained: RunStore) -> None:
    from transformers import StoppingCriteria, StoppingCriteriaList

    diagnoser = StudentDiagnoser(
        download_student(trained, "text"), StudentDiagnoseConfig(max_new_tokens=12)
    )

    def ids(text: str) -> torch.Tensor:
        return torch.tensor([diagnoser.tokenizer.encode(text, add_special_tokens=False)])

    assert diagnoser.stop_at_final(ids(f"Memory is poor.\n{FINAL}"), None).all()
    assert not diagnoser.stop_at_final(ids("Memory is poor."), None).any()

    # Generation honours the criterion (the random student never writes the final line).
    class StopAtOnce(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: object, **_: object) -> torch.Tensor:
            return torch.ones(len(input_ids), dtype=torch.bool)

    description = "A 74-year-old woman with an MMSE of 24."
    assert diagnoser.diagnose([description], None)[0]["completion_tokens"] == 12
    diagnoser.stop_at_final = StoppingCriteriaList([StopAtOnce()])
    assert diagnoser.diagnose([description], None)[0]["completion_tokens"] == 1


def test_a_rationale_then_label_student_is_refused_an_answer_without_its_rationale(
    trained: RunStore, tmp_path: Path
) -> None:
    # Scored right after the prompt, such a student answers a sequence it never trained on.
    root = tmp_path / "run"
    shutil.copytree(trained.root, root, ignore=shutil.ignore_patterns("*.nii.gz", "student-text"))
    marker = root / "checkpoints" / "text" / "final" / "student.json"
    info = json.loads(marker.read_text())
    marker.write_text(json.dumps(info | {"config": info["config"] | {"loss": "rationale_label"}}))
    without = StudentDiagnoseConfig(generate_rationale=False)

    with pytest.raises(AnswerWithoutRationaleError, match="generate_rationale: true"):
        run_student_diagnose("text", without, RunStore(str(root)))
    with pytest.raises(AnswerWithoutRationaleError, match="rationale_label"):
        StudentDiagnoser(marker.parent, without)  # the served student too
    assert not (root / "predictions" / "student-text").exists()


def test_only_the_balanced_decision_needs_the_training_mix_of_an_older_export(
    trained: RunStore, tmp_path: Path
) -> None:
    # An export from before `label_counts` was recorded.
    final = tmp_path / "final"
    shutil.copytree(download_student(trained, "text"), final)
    info = json.loads((final / "student.json").read_text())
    del info["label_counts"]
    (final / "student.json").write_text(json.dumps(info))

    with pytest.raises(NoTrainingMixError, match="decision: most_probable"):
        StudentDiagnoser(final, StudentDiagnoseConfig())
    free = StudentDiagnoser(final, StudentDiagnoseConfig(constrain_answer=False))
    argmax = StudentDiagnoser(final, StudentDiagnoseConfig(decision="most_probable"))
    assert (free.decision, free.prior) == (None, None)
    assert (argmax.decision, argmax.prior) == ("most_probable", None)
