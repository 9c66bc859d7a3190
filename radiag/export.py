"""`radiag export`: a run's augmented data set, and its students, in formats other tools read.

A lab rationalizes a cohort once and trains its own models on the result, often with other
tools. The export writes, to a local folder or an s3:// prefix:

    data/{train,validation,test}.parquet  every labelled visit of the run's splits (subjects
                                          never cross), the teacher's rationale beside the
                                          training rows: `load_dataset("parquet", ...)`, and
                                          `load_dataset(<folder>)` through the card's configs
    dataset/                              the same as a `datasets.DatasetDict` (load_from_disk)
    chat/train.jsonl                      the training rows whose rationale passed QC as chat
                                          messages: what the students train on (the diagnosis
                                          prompt, never the label; then the rationale and the
                                          final line), which TRL's SFT trainer reads as is
    README.md                             the dataset card

Data-use agreements: ADNI and AIBL records may not be redistributed. A cohort that is not
the synthetic one exports patient ids, labels and rationales; descriptions (which restate
the record) only with `include_descriptions`; raw record columns never. What is left out is
returned, said on the console and written in the card. The chat file needs descriptions.

`export_student` copies a trained student (`lm/`: a Hugging Face causal LM, LoRA merged;
`adapter/`; the MRI prefix of the MRI+text student; `student.json`, its provenance) with a
model card: base model, finetuning, loss, data, test-split metrics with their CIs where the
run was evaluated, intended use, limitations, precision.

`hub_repo` also uploads what was written to a private Hugging Face Hub repository
(`push_to_hub`; the token is HF_TOKEN's or a `hf auth login`'s). Untested against the Hub
itself: the development machines have no network.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from radiag.cohort.schema import Label
from radiag.cohort.stages import COHORT_STAGE, SPLITS_STAGE
from radiag.contract import StageNotReady, read_record
from radiag.errors import UserError
from radiag.evaluation.criteria import score_rationales
from radiag.store import RunStore
from radiag.students.config import (
    FINAL_MARKER,
    StudentDiagnoseConfig,
    StudentKind,
    distill_stage,
    model_name,
    student_diagnose_stage,
)
from radiag.students.formatting import targets
from radiag.teacher.prompts import ANSWERS
from radiag.teacher.stages import RATIONALIZE_STAGE, read_output

SPLITS = {"train": "train", "validation": "val", "test": "test"}
"""Hugging Face split name -> the run's split file."""
RATIONALE_COLUMNS = ("rationale", "model", "prompt_version", "sampling", "qc_flagged",
                     "qc_reasons", "created_at")  # fmt: skip
"""What each training row carries from the rationalize stage (provenance included)."""
RENAMED = {"model": "rationale_model", "sampling": "rationale_sampling"}
"""Rationale columns whose names would be ambiguous beside the record's."""
PROVENANCE = (*(RENAMED.get(c, c) for c in RATIONALE_COLUMNS), "split")
"""The exported columns that say where a row's rationale came from."""
ALWAYS = ("patient_id", "label")
PAPER_MEAN_WORDS = 269.4
"""Mean rationale length of the paper's teacher (Kwon et al., AAAI 2024), for the card."""


@dataclass(frozen=True)
class Exported:
    """What an export wrote and what it left out, for the console."""

    uri: str
    rows: dict[str, int]  # per Hugging Face split
    chat_rows: int
    left_out: list[str]  # sentences: what, and why
    hub_url: str | None = None


class HubPushFailed(UserError, RuntimeError):
    """The export was written, but its upload to the Hub failed; the message says both."""


def hub_problem(repo: str) -> str | None:
    """Why `--push-to-hub repo` cannot work, found before anything is exported; or None."""
    from huggingface_hub import constants, get_token

    if repo.count("/") != 1 or not all(repo.split("/")):
        return f"--push-to-hub {repo}: name the repository as owner/name"
    if constants.HF_HUB_OFFLINE:
        return (
            "--push-to-hub cannot reach the Hub while HF_HUB_OFFLINE is set (the jobs' runtime "
            "environment sets it: nothing downloads at run time); unset it for this command"
        )
    if get_token() is None:
        return "--push-to-hub needs a Hugging Face write token: set HF_TOKEN or run `hf auth login`"
    return None


def push_to_hub(local: Path, repo: str, repo_type: Literal["dataset", "model"]) -> str:
    """Upload an export folder to the Hub repository `repo` (owner/name), created private
    if it does not exist; returns the repository's URL.

    Raises:
        HubPushFailed: the Hub refused or could not be reached, with its reason.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        url = api.create_repo(repo, repo_type=repo_type, private=True, exist_ok=True)
        api.upload_folder(folder_path=local, repo_id=repo, repo_type=repo_type,
                          commit_message="radiag export")  # fmt: skip
    except (HfHubHTTPError, OSError) as err:
        raise HubPushFailed(
            f"the export was written, but its push to the Hub repository {repo} failed: {err}; "
            "rerun the command to push again"
        ) from None
    return str(url)


def export_dataset(
    store: RunStore, target: str, include_descriptions: bool = False, hub_repo: str | None = None
) -> Exported:
    """Write the run's augmented data set to `target` (local folder or s3:// prefix), and
    to the Hub repository `hub_repo` if given."""
    source = _cohort_source(store)
    synthetic = source == "synthetic"
    rationales = read_output(store, "rationalize").to_pandas()
    rationales = rationales[rationales["error"].isna() & rationales["rationale"].notna()]
    splits = {name: _split_rows(store, file, rationales) for name, file in SPLITS.items()}
    columns, left_out = _exported_columns(splits["train"], synthetic, include_descriptions)
    tables = _tables({name: frame[columns] for name, frame in splits.items()})
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch)
        (local / "data").mkdir()
        for name, table in tables.items():
            pq.write_table(table, local / "data" / f"{name}.parquet")
        _save_dataset_dict(tables, local / "dataset")
        chat = _chat_rows(splits["train"]) if "description" in columns else []
        if "description" not in columns:
            left_out.append("chat/train.jsonl: the chat turns hold the description")
        (local / "chat").mkdir()
        (local / "chat" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
        card = dataset_card(store, splits, source, left_out, len(chat))
        (local / "README.md").write_text(card)
        out = RunStore(target)
        out.upload_dir(local, "")
        hub_url = push_to_hub(local, hub_repo, "dataset") if hub_repo else None
    return Exported(out.uri, {n: len(f) for n, f in splits.items()}, len(chat), left_out, hub_url)


def _cohort_source(store: RunStore) -> str:
    record = read_record(store, COHORT_STAGE)
    if record is None or record.status != "complete":
        raise StageNotReady(f"stage cohort has not finished in {store.uri}: nothing to export")
    return record.identity.config["source"]


def _split_rows(store: RunStore, file: str, rationales: pd.DataFrame) -> pd.DataFrame:
    """One split's labelled visits, with the training rows' rationales beside them."""
    frame = store.read_table(f"splits/{file}.parquet").to_pandas()
    frame = frame[frame["label"].notna()]
    columns = ["patient_id", *RATIONALE_COLUMNS]
    joined = frame.merge(rationales[columns], on="patient_id", how="left")
    joined = joined.rename(columns=RENAMED)
    joined["split"] = file
    return joined.reset_index(drop=True)


def _exported_columns(
    train: pd.DataFrame, synthetic: bool, include_descriptions: bool
) -> tuple[list[str], list[str]]:
    """The columns every split exports, and sentences naming what is left out and why."""
    provenance = [c for c in train.columns if c in PROVENANCE]
    if synthetic:
        return list(train.columns), []
    record = [c for c in train.columns if c not in {*ALWAYS, *provenance, "description"}]
    left_out = [f"the source record's columns ({len(record)}, e.g. {', '.join(record[:4])}): "
                "the cohort's data-use agreement does not allow redistributing them"]  # fmt: skip
    keep = [*ALWAYS, *provenance]
    if include_descriptions:
        keep.insert(2, "description")
    else:
        left_out.append("description: it restates the record (--include-descriptions adds it)")
    return keep, left_out


def _tables(frames: dict[str, pd.DataFrame]) -> dict[str, pa.Table]:
    """Every split with the training split's column types: a column that is empty in a
    split (no rationales in test) keeps its type, so readers see one schema."""
    schema = pa.Table.from_pandas(frames["train"], preserve_index=False).schema
    return {
        name: pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
        for name, frame in frames.items()
    }


def _save_dataset_dict(tables: dict[str, pa.Table], directory: Path) -> None:
    """The splits as a `datasets.DatasetDict` directory, which `load_from_disk` reads."""
    from datasets import Dataset, DatasetDict

    DatasetDict({name: Dataset(table) for name, table in tables.items()}).save_to_disk(
        str(directory)
    )


def _chat_rows(train: pd.DataFrame) -> list[dict[str, Any]]:
    """QC-passed training rationales as the chat a `rationale_label` student trains on."""
    usable = train[train["rationale"].notna() & ~train["qc_flagged"].fillna(False).astype(bool)]
    rows = []
    for row in usable.astype(object).where(usable.notna(), None).to_dict("records"):
        (target,) = targets(row, "rationale_label", row.get("prompt_version") or "v1")
        answer = f"{target.text} {ANSWERS[Label(row['label'])]}"
        rows.append({
            "messages": [*target.messages, {"role": "assistant", "content": answer}],
            "patient_id": row["patient_id"],
        })  # fmt: skip
    return rows


def _automatic_criteria(explained: pd.DataFrame) -> str:
    """Mean consistency and specificity of the exported rationales, each checked against its
    own record and the label it explains."""
    if explained.empty:
        return "n/a (no rationales)"
    rows = explained.assign(model=explained["rationale_model"], diagnosis=explained["label"])
    scores = score_rationales(rows, explained.set_index("patient_id"))
    means = scores.groupby("criterion")["score"].mean()
    scored = ", ".join(f"{name} {means[name]:.2f}" for name in ("consistency", "specificity"))
    return f"{scored} (mean over {len(explained)} rationales)"


def dataset_card(
    store: RunStore,
    splits: dict[str, pd.DataFrame],
    source: str,
    left_out: list[str],
    chat_rows: int,
) -> str:
    """README.md with Hugging Face's YAML front matter: what the data is, where it came
    from, how it was made, what it holds and what it leaves out."""
    train = splits["train"]
    explained = train[train["rationale"].notna()]
    words = [len(text.split()) for text in explained["rationale"]]
    flagged = explained["qc_flagged"].fillna(False).astype(bool)
    reasons = Counter(
        r for rs in explained.loc[flagged, "qc_reasons"] if rs is not None for r in rs
    )
    models = sorted(explained["rationale_model"].dropna().unique())
    versions = sorted(explained["prompt_version"].dropna().unique())
    sampling = sorted(explained["rationale_sampling"].dropna().unique())
    identities = {
        stage.name: (record.fingerprint if (record := read_record(store, stage)) else None)
        for stage in (COHORT_STAGE, SPLITS_STAGE, RATIONALIZE_STAGE)
    }
    synthetic = source == "synthetic"
    front = {
        "license": "other",
        "license_name": "synthetic-data" if synthetic else "source-cohort-data-use-agreement",
        "language": ["en"],
        "task_categories": ["text-classification", "text-generation"],
        "tags": ["medical", "alzheimers-disease", "clinical-reasoning", "rationale-distillation"],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": n, "path": f"data/{n}.parquet"} for n in SPLITS]}],
    }  # fmt: skip
    labels = "\n".join(
        f"| {name} | {len(frame)} | "
        + " | ".join(str(int((frame["label"] == label).sum())) for label in Label)
        + " |"
        for name, frame in splits.items()
    )
    length = (
        f"{len(words)} rationales: mean {statistics.fmean(words):.1f} words, median "
        f"{statistics.median(words):.0f}, range {min(words)}-{max(words)} (the paper's "
        f"teacher: mean {PAPER_MEAN_WORDS})"
        if words else "no rationales"
    )  # fmt: skip
    flag_rate = f"{flagged.mean():.1%}" if len(flagged) else "n/a"
    criteria = _automatic_criteria(explained)
    reason_lines = "\n".join(f"- {reason}: {n}" for reason, n in reasons.most_common()) or "- none"
    notice = (
        "Synthetic cohort, generated by radiag and calibrated to published ADNI statistics: "
        "no real patient is in it, and it may be shared freely."
        if synthetic
        else f"Derived from the `{source}` cohort, whose data-use agreement forbids "
        "redistributing its records. Only patient ids, labels and generated rationales are "
        "here by default; check your agreement before sharing even these."
    )
    omitted = "\n".join(f"- {line}" for line in left_out) or "- nothing"
    return f"""---
{json.dumps(front, indent=1)}
---
# radiag augmented data set: {Path(store.uri).name}

Clinical rationales written by a teacher LLM for the training split of a cohort of
Alzheimer's disease diagnoses (dementia, mild cognitive impairment, normal cognition), after
Kwon et al., *Large Language Models are Clinical Reasoners* (AAAI 2024), made with radiag.

## Source and licence

{notice}

Left out of this export:
{omitted}

## How it was made

- Run: `{store.uri}`; stage identities: {json.dumps(identities)}
- Teacher: {", ".join(models) or "n/a"}; prompt version {", ".join(versions) or "n/a"}
- Sampling: {"; ".join(sampling) or "n/a"}
- The teacher saw each training patient's description and true diagnosis and explained
  the reasoning (label-conditioned rationalization). Validation and test rows carry no
  rationale. Splits are by subject: no subject is in two splits.

## What it holds

| split | rows | {" | ".join(label.value for label in Label)} |
|---|---|{"---|" * len(Label)}
{labels}

- Rationale length: {length}
- QC flag rate (rule checks: contradictions with the record, answer mismatch): {flag_rate}
{reason_lines}
- Automatic criteria (1-5, scored as the run's report scores the test split's rationales):
  {criteria}; helpfulness needs rationales the reader was not fitted on, so it is in the
  run's report, not here
- `chat/train.jsonl`: {chat_rows} QC-passed training rows as chat messages (system, user:
  the zero-shot diagnosis prompt without the label, assistant: rationale + final line)

## Use

Research only. Not a medical device; not for diagnosing patients. Rationales can be fluent
and wrong: the QC flags catch contradictions with the record, not every error.

## Citation

Kwon, T. et al. Large Language Models are Clinical Reasoners: Reasoning-Aware Diagnosis
Framework with Prompt-Generated Rationales. AAAI 2024.
"""


def export_student(
    store: RunStore, kind: StudentKind, target: str, hub_repo: str | None = None
) -> tuple[str, str | None]:
    """Copy the run's trained `kind` student to `target` with a model card (README.md), and
    to the Hub repository `hub_repo` if given; returns where it went (target, Hub URL)."""
    record = read_record(store, distill_stage(kind))
    if record is None or record.status != "complete":
        raise StageNotReady(f"stage distill-{kind} has not finished in {store.uri}: no student")
    from radiag.students.predict import download_student  # with torch: only for a student

    local = download_student(store, kind)
    try:
        info = json.loads((local / FINAL_MARKER).read_text())
        (local / "README.md").write_text(model_card(store, kind, info, record.fingerprint))
        out = RunStore(target)
        out.upload_dir(local, "")
        hub_url = push_to_hub(local, hub_repo, "model") if hub_repo else None
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return out.uri, hub_url


def _test_metrics(store: RunStore, model: str) -> str:
    """The student's line of the run's evaluation, or why there is none."""
    if not store.exists("reports/metrics.json"):
        return "Not evaluated yet: `radiag evaluate --run <run>` adds them to this card's run."
    rows = {m["model"]: m for m in store.read_json("reports/metrics.json")["models"]}
    if (m := rows.get(model)) is None:
        return f"The run's evaluation has no `{model}` row (its test-split diagnosis never ran)."
    return (
        f"On the run's test split ({m['n']} visits, coverage {m['coverage']:.2f}), subject-"
        f"bootstrap 95% CIs: balanced accuracy {m['balanced_accuracy']:.3f} "
        f"[{m['balanced_accuracy_lo']:.3f}, {m['balanced_accuracy_hi']:.3f}], macro-F1 "
        f"{m['macro_f1']:.3f} [{m['macro_f1_lo']:.3f}, {m['macro_f1_hi']:.3f}], mAUC "
        f"{m['mauc'] if m['mauc'] is None else round(m['mauc'], 3)}."
    )


def _answer_rule(store: RunStore, kind: StudentKind) -> str:
    """How the run's diagnosis chose the student's answers: its metrics depend on it."""
    from radiag.students.predict import read_fitted_offsets  # with torch, as its caller

    record = read_record(store, student_diagnose_stage(kind))
    if record is None:
        return ""
    cfg = StudentDiagnoseConfig.model_validate(record.identity.config)
    if not cfg.constrain_answer:
        return "Each answer is the student's own final line, parsed."
    if cfg.decision == "validation":
        offsets = json.dumps(read_fitted_offsets(store, kind))
        rule = "the option with the greatest log-probability plus a per-class offset fitted "
        rule += f"on the run's val split ({offsets})"
    elif cfg.decision == "balanced":
        rule = "the option with the greatest probability over its share of the training rows"
    else:
        rule = "the most probable option"
    return f"Each answer is {rule} (`decision: {cfg.decision}`); radiag answers alike."


def model_card(store: RunStore, kind: StudentKind, info: dict[str, Any], identity: str) -> str:
    """README.md for an exported student, with Hugging Face's YAML front matter."""
    cfg = info["config"]
    front = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "base_model": Path(info["base_model"]).name,
        "tags": ["medical", "alzheimers-disease", "rationale-distillation", "radiag"],
    }
    mri = (
        "The MRI+text student also reads a T1 volume: `mri_prefix.pt` holds its 3-D encoder "
        "and projector, whose outputs are prefixed to the text (radiag loads both)."
        if kind == "vlm" else "A text-only student: it reads the patient's description."
    )  # fmt: skip
    return f"""---
{json.dumps(front, indent=1)}
---
# radiag {kind} student: {Path(store.uri).name}

A small language model distilled from a teacher LLM's clinical rationales to diagnose
Alzheimer's disease, mild cognitive impairment or normal cognition from a patient's
description, after Kwon et al. (AAAI 2024). {mri}

## Training

- Base model: `{info["base_model"]}`
- Finetuning: {cfg.get("finetune")}; loss `{cfg.get("loss")}`; {info["steps"]} optimizer steps;
  precision {cfg.get("precision")}, exported in {cfg.get("export_dtype")}
- Data: {json.dumps(info["examples"])} (training split of `{store.uri}`; export it with
  `radiag export --run {store.uri} --to ...` for its dataset card)
- Stage identity: `{identity}`

## Evaluation

{_test_metrics(store, model_name(kind))} {_answer_rule(store, kind)}

## Intended use and limitations

Research on clinical reasoning distillation only. Not a medical device: never use it to
diagnose a patient. Its rationales can be fluent and wrong; its answers inherit the
teacher's errors and the cohort's biases (a synthetic cohort, when the run used one, has no
real patient behind it). Load it with radiag (`radiag serve`, `radiag diagnose`), or
`lm/` alone with transformers for the text part.
"""
