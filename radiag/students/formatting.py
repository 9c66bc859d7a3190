"""What a student reads and writes: training sequences from teacher rationales.

A student sees the same zero-shot question as the teacher's diagnosis prompt
(description, the three options; never the label) and learns to answer with the
teacher's rationale and the final line. Three losses (after Hsieh et al. 2023):

- `label`: the target is the final line only (classic fine-tuning, no rationale);
- `rationale_label`: the rationale, then the final line, as one sequence; with
  `rationale_swap`, some rows answer after another row's rationale (context only, no
  loss on it), so the answer cannot just copy the label the teacher wrote into it;
- `step_by_step`: two tasks on the same patient, told apart by a prefix in the prompt:
  `[label]` -> the final line, `[rationale]` -> the rationale. The loss is
  label loss + `rationale_weight` x rationale loss, and at inference the label
  comes from the `[label]` task alone (the rationale is optional output).

The final line's tokens are fixed once its letter is chosen, so a token-mean over
them says little about the diagnosis. `encode_target` therefore marks the answer
option's tokens (`answer_mask`): training adds their summed log-likelihood, the
very quantity `predict.py` compares across the three options, as its own loss term.

Each transform here maps one row dict to token ids; none of them needs Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from radiag.cohort.schema import Label
from radiag.students.config import LossName
from radiag.teacher.engines import Messages
from radiag.teacher.prompts import ANSWERS, FINAL, QUESTION, TEMPLATES

if TYPE_CHECKING:  # transformers loads with the models, not with the configs that import this
    from transformers import PreTrainedTokenizerBase

IGNORE = -100  # label of a position that carries no loss (prompt, prefix, padding)
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
    """One training sequence: the prompt, then `text`, then (if any) the answer option."""

    kind: Kind
    messages: Messages
    text: str  # what precedes the option: "...\nFinal Diagnosis:", or the whole rationale
    answer: Label | None = None  # the option that ends the final line
    learn_text: bool = True  # False: `text` is context only (a swapped rationale), no loss


def targets(row: dict[str, Any], loss: LossName, prompt_version: str = "v1") -> list[Target]:
    """The sequences one training row becomes under `loss`."""
    label = Label(row["label"])
    rationale = (row.get("rationale") or "").strip()
    description = row["description"]
    if loss == "label":
        messages = student_messages(description, None, prompt_version)
        return [Target("label", messages, FINAL, label)]
    if loss == "rationale_label":
        messages = student_messages(description, None, prompt_version)
        text = f"{rationale}\n{FINAL}"
        return [Target("rationale_label", messages, text, label, not row.get("swapped", False))]
    return [
        Target("label", student_messages(description, "label", prompt_version), FINAL, label),
        Target("rationale", student_messages(description, "rationale", prompt_version), rationale),
    ]


def option_ids(tokenizer: PreTrainedTokenizerBase, label: Label) -> list[int]:
    """Token ids of one answer option as it follows `Final Diagnosis:` (training and scoring)."""
    return tokenizer.encode(" " + ANSWERS[label], add_special_tokens=False)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    """Token ids of a chat prompt, ending where the assistant's answer starts."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_target(
    tokenizer: PreTrainedTokenizerBase, target: Target, max_length: int
) -> dict[str, Any] | None:
    """input_ids, labels (prompt masked, and the text too where it is context only) and
    answer_mask for one target, ending with EOS.

    `answer_mask` is 1 on the answer option's tokens (aligned with `labels`), 0 elsewhere.
    A sequence longer than `max_length` is shortened inside the rationale, so the final
    line survives; None when even the prompt and final line do not fit.
    """
    prompt = encode_prompt(tokenizer, target.messages)
    option = option_ids(tokenizer, target.answer) if target.answer is not None else []
    text = tokenizer.encode(target.text, add_special_tokens=False)
    room = max_length - len(prompt) - len(option) - 1  # 1: EOS
    if len(text) > room:
        text = _shortened(tokenizer, target, room)
        if text is None:
            return None
    input_ids = [*prompt, *text, *option, tokenizer.eos_token_id]
    context = len(prompt) + (0 if target.learn_text else len(text))  # read, not learned
    return {
        "kind": target.kind,
        "input_ids": input_ids,
        "labels": [IGNORE] * context + input_ids[context:],
        "answer_mask": [0] * (len(prompt) + len(text)) + [1] * len(option) + [0],
    }


def _shortened(tokenizer: PreTrainedTokenizerBase, target: Target, room: int) -> list[int] | None:
    """The target's text cut to `room` tokens inside the rationale; None if the
    final line's own tokens do not fit."""
    if target.kind == "label":
        return None
    # Keep "\nFinal Diagnosis:" (the tail) whole; cut the rationale (head) to fit.
    if target.kind == "rationale_label":
        head, _, tail = target.text.rpartition("\n")
        tail_ids = tokenizer.encode("\n" + tail, add_special_tokens=False)
    else:
        head, tail_ids = target.text, []
    keep = room - len(tail_ids)
    if keep <= 0:
        return None
    return tokenizer.encode(head, add_special_tokens=False)[:keep] + tail_ids
