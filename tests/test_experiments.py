"""`radiag experiments`: the shared stages once, each arm under the stage contract (and on
an external cohort), a table with one row per model, comparisons with the reference arm,
and a rerun after a kill that redoes nothing finished.

The CI preset runs with the session's stub teacher (an OpenAI-compatible endpoint; the real
vLLM teacher stages are tests/teacher) and the tiny student, so its numbers are smoke tests
and the table must say so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from radiag.cohort.schema import Label
from radiag.config import load_config
from radiag.evaluation.metrics import paired_difference
from radiag.experiments.config import ExperimentsConfig
from radiag.experiments.runner import link_shared
from radiag.pipeline import pipeline_stages
from radiag.store import RunStore
from radiag.teacher.prompts import FINAL, Shot, diagnose_messages

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "configs" / "experiments" / "ci.yaml"


def test_every_preset_validates_and_names_its_reference_arm() -> None:
    for preset in sorted((ROOT / "configs" / "experiments").glob("*.yaml")):
        cfg = load_config(ExperimentsConfig, preset)
        assert cfg.reference in {arm.name for arm in cfg.arms}, preset.name


def test_an_arm_is_one_model_on_the_shared_sections() -> None:
    cfg = load_config(ExperimentsConfig, PRESET)
    shared = cfg.shared_run()
    for arm in cfg.arms:
        run = cfg.arm_run(arm)
        assert run.run_dir.endswith(f"ci/arms/{arm.name}")
        for section in ("cohort", "mri", "describe", "split", "rationalize"):
            assert getattr(run, section) == getattr(shared, section), (arm.name, section)
        made = [run.diagnose, run.baseline, run.mri_only, run.students.text, run.students.vlm]
        assert sum(m is not None for m in made) == 1, arm.name
    assert shared.diagnose is shared.baseline is shared.mri_only is shared.students.text is None


def test_an_mri_only_arm_runs_the_encoder_with_a_linear_head_as_kind_mri() -> None:
    cfg = load_config(ExperimentsConfig, ROOT / "configs" / "experiments" / "cpu.yaml")
    (arm,) = [arm for arm in cfg.arms if arm.mri_only is not None]
    assert arm.kind == "mri"
    run = cfg.arm_run(arm)
    assert run.mri_only == arm.mri_only and run.students.vlm is run.students.text is None
    assert ("mri-only", "mri-only") in [(n, n) for n, _ in pipeline_stages(run)]


def test_an_arm_with_two_models_or_none_is_refused() -> None:
    tree = yaml.safe_load(PRESET.read_text())
    tree["arms"][0]["baseline"] = {"classifiers": ["logistic"]}
    with pytest.raises(ValueError, match="exactly one of diagnose, students, baseline, mri_only"):
        ExperimentsConfig.model_validate(tree)
    tree = yaml.safe_load(PRESET.read_text()) | {"reference": "nobody"}
    with pytest.raises(ValueError, match="reference 'nobody' is not an arm"):
        ExperimentsConfig.model_validate(tree)


def test_an_answer_only_prompt_asks_for_the_final_line_and_shows_no_reasoning() -> None:
    shot = Shot("A 70-year-old woman.", "Her MMSE is low, so AD.", Label.AD)
    messages = diagnose_messages("A 74-year-old man.", [shot], reasoning="answer_only")
    assert messages[2] == {"role": "assistant", "content": f"{FINAL} (A) Alzheimer's Disease"}
    assert "one line only" in messages[-1]["content"]
    cot = diagnose_messages("A 74-year-old man.", [shot])
    assert cot[2]["content"].startswith("Her MMSE is low") and "step by step" in cot[-1]["content"]


def test_the_paired_difference_resamples_subjects_once_for_both_models() -> None:
    truth = pd.Series(["AD", "MCI", "CN"] * 10, index=[f"s-{i}-bl" for i in range(30)])
    right = pd.DataFrame({"patient_id": truth.index, "diagnosis": truth.to_numpy()})
    always_cn = right.assign(diagnosis="CN")
    result = paired_difference(right, always_cn, truth, n_boot=200)
    assert result["n"] == 30
    assert result["difference"] == pytest.approx(1 - 1 / 3)
    assert result["difference_lo"] <= result["difference"] <= result["difference_hi"]
    assert (result["a_only"], result["b_only"]) == (20, 0)
    same = paired_difference(right, right, truth, n_boot=200)
    assert same["difference"] == same["difference_lo"] == same["difference_hi"] == 0


def test_an_arm_gets_the_shared_tables_but_not_the_volumes(tmp_path: Path) -> None:
    shared, arm = RunStore(str(tmp_path / "shared")), RunStore(str(tmp_path / "arm"))
    shared.write_bytes("splits/train.parquet", b"table")
    shared.write_bytes("mri/volumes/s-1-bl_T1.nii.gz", b"volume")
    shared.write_bytes("mri/mri.parquet", b"paths")
    shared.write_bytes("predictions/teacher/part-0.parquet", b"not shared")
    link_shared(shared, arm)
    assert arm.read_bytes("splits/train.parquet") == b"table"
    assert arm.read_bytes("mri/mri.parquet") == b"paths"
    assert not arm.exists("mri/volumes/s-1-bl_T1.nii.gz")
    assert not arm.exists("predictions/teacher")


@pytest.mark.slow
def test_the_ci_preset_writes_the_table_and_a_killed_arm_resumes_without_redoing_finished_ones(
    tmp_path: Path, tiny_model: Path, stub_teacher: str
) -> None:
    """One process, SIGKILLed while the student arm trains; a rerun finishes that arm and
    leaves the shared run and the finished arms as they were (a subprocess: a kill must be
    real, and the stub teacher makes it cost seconds, not engine starts)."""
    tree = yaml.safe_load(PRESET.read_text())
    stub = {"backend": "openai", "base_url": stub_teacher, "model": "stub"}
    tree["output_dir"] = str(tmp_path)
    tree["rationalize"]["engine"] = stub
    tree["external"]["cohort"] = str(ROOT / tree["external"]["cohort"])
    for arm in tree["arms"]:
        if "diagnose" in arm:
            arm["diagnose"]["engine"] = stub
        if "students" in arm:
            arm["students"]["text"]["model"] = {"path": str(tiny_model)}
    config = tmp_path / "ci.yaml"
    config.write_text(yaml.safe_dump(tree))
    command = [sys.executable, "-m", "radiag.cli", "experiments", "--config", str(config)]
    root, student = tmp_path / "ci", tmp_path / "ci" / "arms" / "student-label"

    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (student / "checkpoints" / "text" / "stage.json").exists():
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the student arm did not start in time"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (student / "arm.json").exists()
    finished = {
        path: path.stat().st_mtime_ns for path in _outputs(root) if "student-label" not in str(path)
    }
    assert any("teacher-fewshot-cot/predictions" in str(p) for p in finished)

    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    redone = [
        p for p, mtime in finished.items() if p.stat().st_mtime_ns != mtime and _is_stage_output(p)
    ]
    assert redone == [], "finished stages were written again"

    table = pd.read_csv(root / "table.csv")
    assert list(table["name"]) == [
        "teacher-fewshot-cot",
        "teacher-zeroshot-answer",
        "baseline-logistic",
        "student-label",
    ]
    assert list(table["kind"]) == ["teacher", "teacher", "baseline", "student"]
    assert (table["n"] == table["n"].iloc[0]).all() and table["n"].iloc[0] > 0  # one test split
    assert table["balanced_accuracy_lo"].le(table["balanced_accuracy"]).all()
    assert table["smoke"].str.contains("test patients").all()  # 16 test visits: no result
    assert table.loc[table["kind"] == "baseline", "tokens"].fillna(0).eq(0).all()  # no LM
    assert table.loc[table["kind"] == "teacher", "tokens"].gt(0).all()
    # Every arm's model also diagnosed the second site's 60 baseline visits.
    assert table["external_n"].eq(60).all()
    assert table["external_balanced_accuracy"].between(0, 1).all()
    assert table["external_balanced_accuracy_lo"].le(table["external_balanced_accuracy"]).all()
    comparisons = pd.read_csv(root / "comparisons.csv")
    assert set(comparisons["name"]) == set(table["name"]) - {"student-label"}
    assert (comparisons["reference"] == "student-label").all()
    report = (root / "report.html").read_text()
    assert report.index("teacher-fewshot-cot") < report.index("Provenance")
    assert (root / "forest.png").read_bytes()[:4] == b"\x89PNG"
    for suffix in ("md", "tex", "parquet"):
        assert (root / f"table.{suffix}").stat().st_size > 0
    provenance = json.loads((root / "experiment.json").read_text())
    assert set(provenance["arms"]) == set(table["name"])
    assert provenance["machine"]["auto"] in {"bfloat16", "float32"}
    shared_manifest = json.loads((root / "shared" / "manifest.json").read_text())
    assert set(shared_manifest["stages"]) == {"cohort", "splits", "rationalize"}
    arm_manifest = json.loads((student / "manifest.json").read_text())
    assert set(arm_manifest["stages"]) == {"distill-text", "diagnose-student-text"}
    assert "smoke run: student-label" in second.stderr


def _outputs(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and "logs" not in p.parts]


def _is_stage_output(path: Path) -> bool:
    """A table or model a stage wrote, or an arm's record; not a record or manifest a rerun
    reads and may rewrite, nor a shared table an arm copies in again."""
    own = "shared" in path.parts or "predictions" in path.parts or "checkpoints" in path.parts
    return path.name == "arm.json" or (own and path.suffix in {".parquet", ".safetensors"})
