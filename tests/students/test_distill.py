"""Distillation on Ray Train: what a student learns from, what it writes, where it refuses.

Slow: each training run starts Ray Train workers (~20-30 s on 2 cores).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from transformers import AutoModelForCausalLM

from radiag.cohort.schema import Label
from radiag.contract import StageSummary
from radiag.outputs import write_part
from radiag.store import RunStore
from radiag.students.config import DistillConfig
from radiag.students.distill import (
    StudentDataError,
    class_weights,
    label_counts,
    load_final,
    run_distill,
    training_examples,
    training_sequences,
    with_swapped_rationales,
)
from radiag.students.formatting import IGNORE


def test_flagged_rationales_are_left_out_unless_asked(
    fresh_run: RunStore, tiny_student: Callable[..., DistillConfig]
) -> None:
    strict = training_examples("text", tiny_student(), fresh_run)
    lenient = training_examples("text", tiny_student(include_flagged=True), fresh_run)
    flagged = strict.counts["excluded_flagged"]
    assert flagged > 0 and lenient.counts["excluded_flagged"] == 0
    assert lenient.table.num_rows == strict.table.num_rows + flagged


def test_balanced_classes_give_each_diagnosis_a_third_of_the_weight(
    fresh_run: RunStore, tiny_student: Callable[..., DistillConfig], tiny_model: Path
) -> None:
    """QC thins out one class (the bundled teacher's MCI rationales): balanced, the rows
    left of it weigh more, so that each diagnosis carries as much of the loss."""
    from transformers import AutoTokenizer

    examples = training_examples("text", tiny_student(), fresh_run).table
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    counts = label_counts(examples)
    assert len(set(counts.values())) > 1  # the fixture's classes are uneven
    for balance in (False, True):
        cfg = tiny_student(balance_classes=balance, loss="step_by_step")
        sequences, _ = training_sequences(examples, cfg, tokenizer)
        by_label = {
            label: sum(s["weight"] for s in sequences if s["patient_id"] in ids)
            for label, ids in _ids_by_label(examples).items()
        }
        if balance:  # two sequences a row under step_by_step
            assert by_label == pytest.approx({k: 2 * examples.num_rows / 3 for k in counts})
        else:
            assert by_label == {k: 2.0 * n for k, n in counts.items()}


def _ids_by_label(examples: pa.Table) -> dict[str, set[str]]:
    rows = examples.select(["patient_id", "label"]).to_pylist()
    return {
        str(label): {r["patient_id"] for r in rows if r["label"] == str(label)} for label in Label
    }


def test_a_rationale_swap_moves_rationales_between_rows_and_loses_none() -> None:
    rows = [{"patient_id": f"p{i}", "rationale": f"r{i}"} for i in range(10)]
    swapped = with_swapped_rationales(rows, share=0.4, seed=0)
    moved = [r for r in swapped if r.get("swapped")]
    assert len(moved) == 4 and all(r["rationale"] != "r" + r["patient_id"][1:] for r in moved)
    assert sorted(r["rationale"] for r in swapped) == sorted(r["rationale"] for r in rows)
    assert swapped == with_swapped_rationales(rows, share=0.4, seed=0)  # the seed decides
    assert with_swapped_rationales(rows, share=0.0, seed=0) == rows


def test_a_rationale_swapped_student_learns_only_the_answer_after_a_swapped_rationale(
    fresh_run: RunStore, tiny_student: Callable[..., DistillConfig], tiny_model: Path
) -> None:
    from transformers import AutoTokenizer

    examples = training_examples("text", tiny_student(), fresh_run).table
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cfg = tiny_student(loss="rationale_label", rationale_swap=0.5)
    sequences, _ = training_sequences(examples, cfg, tokenizer)
    learned = [[t for t in s["labels"] if t != IGNORE] for s in sequences]
    answer_only = sum(
        len(t) == sum(s["answer_mask"]) + 1 for t, s in zip(learned, sequences, strict=True)
    )
    assert answer_only == round(examples.num_rows / 2)  # the option's tokens and EOS


def test_a_rationale_swap_is_refused_where_no_rationale_precedes_the_answer(
    tiny_student: Callable[..., DistillConfig],
) -> None:
    with pytest.raises(ValueError, match="rationale_swap applies to loss rationale_label only"):
        tiny_student(loss="step_by_step", rationale_swap=0.5)


def test_a_class_with_no_training_row_takes_no_share_of_the_weight() -> None:
    weights = class_weights({"AD": 6, "MCI": 2, "CN": 0}, balance=True)
    assert weights["AD"] * 6 == weights["MCI"] * 2 == pytest.approx(4.0)


def test_rationales_from_another_run_are_refused(
    fresh_run: RunStore, tiny_student: Callable[..., DistillConfig]
) -> None:
    write_part(fresh_run, "rationales", [{"patient_id": "aibl-999-bl", "rationale": "x"}])
    with pytest.raises(StudentDataError, match=r"aibl-999-bl.*another cohort or run"):
        training_examples("text", tiny_student(), fresh_run)


def test_rationales_explaining_another_label_are_refused(
    fresh_run: RunStore, tiny_student: Callable[..., DistillConfig]
) -> None:
    row = fresh_run.read_table("splits/train.parquet").to_pylist()[0]
    other = "CN" if row["label"] != "CN" else "AD"
    newer = datetime.datetime.now(datetime.UTC).isoformat()  # replaces the fixture's row
    rows = [{"patient_id": row["patient_id"], "label_shown": other, "created_at": newer}]
    write_part(fresh_run, "rationales", rows)
    with pytest.raises(StudentDataError, match="explain another label"):
        training_examples("text", tiny_student(), fresh_run)


@pytest.mark.slow
def test_a_text_student_trains_and_exports_a_model_transformers_loads(
    trained_run: Path, tiny_student: Callable[..., DistillConfig]
) -> None:
    """The session's trained run: its text student trained 2 steps with the default loss."""
    store = RunStore(str(trained_run))
    cfg = tiny_student(optim={"max_steps": 2, "batch_size": 4})
    assert cfg.loss == "step_by_step"
    summary = StageSummary.model_validate(store.read_json("checkpoints/text/stage.json")["summary"])

    assert summary.counts["steps"] == 2
    assert summary.counts["sequences"] == 2 * summary.counts["examples"]  # two tasks per row
    final = Path(store.path("checkpoints/text/final"))
    assert (final / "adapter" / "adapter_config.json").is_file()  # LoRA adapter kept
    lm = AutoModelForCausalLM.from_pretrained(final / "lm")  # merged, plain HF
    assert lm.num_parameters() > 0
    lines = (final.parent / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["samples_per_s"] > 0 and m["tokens_per_s"] > 0 for m in metrics)
    assert any("loss_label" in m and "loss_rationale" in m for m in metrics)
    # The class mix it trained on travels with it: its balanced decision divides it out.
    info = json.loads((final / "student.json").read_text())
    train = store.read_table("splits/train.parquet").to_pylist()
    labels = [r["label"] for r in train if r["patient_id"] in set(info["trained_patients"])]
    assert info["label_counts"] == {label: labels.count(label) for label in ("AD", "MCI", "CN")}
    # A second call finds the finished stage and does not train again.
    assert run_distill("text", cfg, store) == summary


@pytest.mark.slow
def test_the_mri_student_skips_unusable_volumes_and_trains_on_the_rest(
    fresh_run: RunStore, tiny_student: Callable[..., DistillConfig], tmp_path: Path
) -> None:
    train = fresh_run.read_table("splits/train.parquet")
    imaged = train.filter(pc.is_valid(train["mri_path"]))["patient_id"].to_pylist()
    corrupt, missing = tmp_path / "corrupt.nii.gz", tmp_path / "missing.nii.gz"
    corrupt.write_bytes(b"not a NIfTI file")
    paths = {imaged[0]: str(corrupt), imaged[1]: str(missing)}
    mri_path = [paths.get(p, m) for p, m in zip(train["patient_id"].to_pylist(),
                                                 train["mri_path"].to_pylist(), strict=True)]  # fmt: skip
    index = train.schema.get_field_index("mri_path")
    fresh_run.write_table(
        "splits/train.parquet", train.set_column(index, "mri_path", pa.array(mri_path, pa.string()))
    )

    cfg = tiny_student(loss="rationale_label", optim={"max_steps": 2, "batch_size": 2})
    summary = run_distill("vlm", cfg, fresh_run)

    assert summary.counts["mri_failed"] == 2 and summary.counts["steps"] == 2
    errors = " ".join(summary.details["mri_errors"])
    assert f"patient {imaged[0]}" in errors and str(corrupt) in errors
    assert f"patient {imaged[1]}" in errors and str(missing) in errors
    model, info = load_final(Path(fresh_run.path("checkpoints/vlm/final")), "float32")
    assert model.mri is not None and info["kind"] == "vlm"
    assert imaged[0] not in info["trained_patients"]


@pytest.mark.slow
def test_deepspeed_zero2_trains_on_two_workers(
    fresh_run: RunStore, tiny_student: Callable[..., DistillConfig]
) -> None:
    cfg = tiny_student(
        optim={"max_steps": 2, "batch_size": 2},
        scaling={"workers": 2, "cpus_per_worker": 0.5, "strategy": "deepspeed", "zero_stage": 2},
    )
    summary = run_distill("text", cfg, fresh_run)

    assert summary.counts["steps"] == 2
    checkpoints = Path(fresh_run.path("checkpoints/text/train"))
    shards = sorted(p.name for p in checkpoints.glob("checkpoint_*/deepspeed/*optim_states.pt"))
    assert any("rank_0" in s for s in shards) and any("rank_1" in s for s in shards)
    model, _ = load_final(Path(fresh_run.path("checkpoints/text/final")), dtype="float32")
    assert model.mri is None


@pytest.mark.slow
def test_checkpoints_and_the_export_go_to_an_s3_run_store(
    split_run: Path, tiny_student: Callable[..., DistillConfig], s3_endpoint: str
) -> None:
    store = RunStore("s3://radiag/runs/students")
    for name in ("splits/train.parquet", "splits/stage.json", "rationales"):
        source = split_run / name
        files = [source] if source.is_file() else sorted(source.glob("*"))
        for file in files:
            store.write_bytes(str(file.relative_to(split_run)), file.read_bytes())

    run_distill("text", tiny_student(optim={"max_steps": 2}), store)

    assert store.list_files("checkpoints/text/final", suffix=".json")
    assert store.exists("checkpoints/text/final/lm/config.json")
    assert store.exists("checkpoints/text/train")
