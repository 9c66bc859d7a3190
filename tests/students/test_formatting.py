"""What a student is trained on: per-loss targets, masked prompts, and never the label in a prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from radiag.cohort.schema import Label
from radiag.students.formatting import (
    IGNORE,
    TASK_PREFIX,
    encode_prompt,
    encode_target,
    option_ids,
    prompt_kinds,
    student_messages,
    targets,
)
from radiag.teacher.prompts import ANSWERS, FINAL, answer_line

ROW = {
    "patient_id": "adni-1-bl",
    "description": "A 74-year-old woman. MMSE 23. Hippocampus: Moderate atrophy.",
    "rationale": "The MMSE of 23 and hippocampal atrophy point to dementia.",
    "label": "AD",
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_label_loss_targets_only_the_final_line() -> None:
    (target,) = targets(ROW, "label")
    assert (target.kind, target.text, target.answer) == ("label", FINAL, Label.AD)


def test_rationale_label_loss_is_one_sequence_ending_with_the_final_line() -> None:
    (target,) = targets(ROW, "rationale_label")
    assert target.text == f"{ROW['rationale']}\n{FINAL}" and target.answer == Label.AD


@pytest.mark.parametrize("loss", ["label", "rationale_label"])
def test_the_answer_mask_marks_exactly_the_option_that_predict_scores(tokenizer, loss) -> None:
    """The answer loss and the inference scoring must read the same tokens."""
    (target,) = targets(ROW, loss)
    encoded = encode_target(tokenizer, target, max_length=1024)
    assert encoded is not None and len(encoded["answer_mask"]) == len(encoded["labels"])
    marked = [t for t, m in zip(encoded["labels"], encoded["answer_mask"], strict=True) if m]
    assert marked == option_ids(tokenizer, Label.AD)
    answer = tokenizer.decode(encoded["input_ids"][-len(marked) - 1 :], skip_special_tokens=True)
    assert answer == " " + ANSWERS[Label.AD]


def test_a_rationale_task_has_no_answer_tokens(tokenizer) -> None:
    _, rationale = targets(ROW, "step_by_step")
    encoded = encode_target(tokenizer, rationale, max_length=1024)
    assert encoded is not None and not any(encoded["answer_mask"])


def test_step_by_step_makes_two_tasks_told_apart_by_a_prompt_prefix() -> None:
    label, rationale = targets(ROW, "step_by_step")
    assert (label.kind, rationale.kind) == ("label", "rationale")
    assert label.messages[-1]["content"].startswith(TASK_PREFIX["label"])
    assert rationale.messages[-1]["content"].startswith(TASK_PREFIX["rationale"])
    assert rationale.text == ROW["rationale"] and rationale.answer is None  # no final line
    assert prompt_kinds("step_by_step") == ("label", "rationale")
    assert prompt_kinds("rationale_label") == (None, None)


@pytest.mark.parametrize("loss", ["label", "rationale_label", "step_by_step"])
def test_no_prompt_states_the_label(loss: str) -> None:
    for target in targets(ROW, loss):
        prompt = " ".join(m["content"] for m in target.messages)
        assert "correct diagnosis is" not in prompt
        assert student_messages(ROW["description"])[1]["content"] in prompt.replace(
            TASK_PREFIX.get(target.kind, ""), ""
        )


def test_prompt_tokens_carry_no_loss_and_the_target_ends_with_eos(tokenizer) -> None:
    (target,) = targets(ROW, "rationale_label")
    encoded = encode_target(tokenizer, target, max_length=1024)
    assert encoded is not None
    prompt = encode_prompt(tokenizer, target.messages)
    assert encoded["input_ids"][: len(prompt)] == prompt
    assert encoded["labels"][: len(prompt)] == [IGNORE] * len(prompt)
    assert encoded["labels"][len(prompt) :] == encoded["input_ids"][len(prompt) :]
    assert encoded["input_ids"][-1] == tokenizer.eos_token_id


def test_a_swapped_rationale_is_context_only_and_the_answer_still_learns(tokenizer) -> None:
    """`rationale_swap`: the rationale of another row is read, never learned; the option
    and EOS after it carry the loss as in any rationale_label sequence."""
    (target,) = targets(ROW | {"swapped": True}, "rationale_label")
    encoded = encode_target(tokenizer, target, max_length=1024)
    assert encoded is not None and not target.learn_text
    learned = [t for t in encoded["labels"] if t != IGNORE]
    assert learned == [*option_ids(tokenizer, Label.AD), tokenizer.eos_token_id]
    marked = [t for t, m in zip(encoded["labels"], encoded["answer_mask"], strict=True) if m]
    assert marked == option_ids(tokenizer, Label.AD)


def test_a_long_rationale_is_cut_but_the_final_line_survives(tokenizer) -> None:
    row = ROW | {"rationale": "Atrophy is marked. " * 400}
    (target,) = targets(row, "rationale_label")
    prompt_length = len(encode_prompt(tokenizer, target.messages))
    encoded = encode_target(tokenizer, target, max_length=prompt_length + 40)
    assert encoded is not None and len(encoded["input_ids"]) <= prompt_length + 40
    answer = tokenizer.decode(encoded["input_ids"][prompt_length:], skip_special_tokens=True)
    assert answer.startswith("Atrophy is marked.")
    assert answer.endswith(answer_line(Label.AD))


def test_a_sequence_whose_final_line_cannot_fit_is_dropped(tokenizer) -> None:
    (target,) = targets(ROW, "label")
    prompt_length = len(encode_prompt(tokenizer, target.messages))
    assert encode_target(tokenizer, target, max_length=prompt_length + 2) is None
