"""What a student reads and writes: training sequences from teacher rationales.

A student sees the same zero-shot question as the teacher's diagnosis prompt
(description, the three options; never the label) and learns to answer with the
teacher's rationale and the final line. Three losses (after Hsieh et al. 2023):

- `label`: the target is the final line only (classic fine-tuning, no rationale);
- `rationale_label`: the rationale, then the final line, as one sequence;
- `step_by_step`: two tasks on the same patient, told apart by a prefix in the prompt:
  `[label]` -> the final line, `[rationale]` -> the rationale. The loss is
  label loss + `rationale_weight` x rationale loss, and at inference the label
  comes from the `[label]` task alone (the rationale is optional output).

Each transform here maps one row dict to token ids; none of them needs Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from radiag.cohort.schema import Label
from radiag.students.modeling import IGNORE
from radiag.teacher.engines import Messages
from radiag.teacher.prompts import QUESTION, TEMPLATES, answer_line

LossName = Literal["label", "rationale_label", "step_by_step"]
Kind = Literal["label", "rationale", "rationale_label"]
TASK_PREFIX: dict[Kind, str] = {"label": "[label] ", "rationale": "[rationale] "}


def student_messages(
    description: str, kind: Kind | None = None, prompt_version: str = "v1"
) -> Messages:
    """The zero-shot diagnosis prompt; step-by-step students get the task prefix in front."""
    template = TEMPLATES[prompt_version]
    user = template.diagnose.format(description=description, question=QUESTION)
    return [
        {"role": "system", "content": template.system},
        {"role": "user", "content": (TASK_PREFIX[kind] if kind else "") + user},
    ]


def prompt_kinds(loss: LossName) -> tuple[Kind | None, Kind | None]:
    """(prompt kind for the label, prompt kind for the rationale) at inference."""
    if loss == "step_by_step":
        return "label", "rationale"
    return None, None


@dataclass(frozen=True)
class Target:
    kind: Kind
    messages: Messages
    text: str


def targets(row: dict[str, Any], loss: LossName, prompt_version: str = "v1") -> list[Target]:
    """The sequences one training row becomes under `loss`."""
    final = answer_line(Label(row["label"]))
    rationale = (row.get("rationale") or "").strip()
    description = row["description"]
    if loss == "label":
        return [Target("label", student_messages(description, None, prompt_version), final)]
    if loss == "rationale_label":
        messages = student_messages(description, None, prompt_version)
        return [Target("rationale_label", messages, f"{rationale}\n{final}")]
    return [
        Target("label", student_messages(description, "label", prompt_version), final),
        Target("rationale", student_messages(description, "rationale", prompt_version), rationale),
    ]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    """Token ids of a chat prompt, ending where the assistant's answer starts."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_target(
    tokenizer: PreTrainedTokenizerBase, target: Target, max_length: int
) -> dict[str, Any] | None:
    """input_ids and labels (prompt masked) for one target, ending with EOS.

    A sequence longer than `max_length` is shortened inside the rationale, so the final
    line survives; None when even the prompt and final line do not fit.
    """
    prompt = encode_prompt(tokenizer, target.messages)
    answer = [*tokenizer.encode(target.text, add_special_tokens=False), tokenizer.eos_token_id]
    room = max_length - len(prompt)
    if len(answer) > room:
        if target.kind == "label":
            return None
        # Keep the final line ("\n" + tail) whole; cut the rationale (head) to fit.
        if target.kind == "rationale_label":
            head, _, tail = target.text.rpartition("\n")
            tail_ids = tokenizer.encode("\n" + tail, add_special_tokens=False)
        else:
            head, tail_ids = target.text, []
        tail_ids = [*tail_ids, tokenizer.eos_token_id]
        keep = room - len(tail_ids)
        if keep <= 0:
            return None
        answer = tokenizer.encode(head, add_special_tokens=False)[:keep] + tail_ids
    return {
        "kind": target.kind,
        "input_ids": prompt + answer,
        "labels": [IGNORE] * len(prompt) + answer,
    }
