"""Rationales made elsewhere, brought into a run as its rationalize stage's output.

A lab may rationalize a large cohort with a hosted model at batch prices (the OpenAI Batch
API: `batch_file` writes its input, one chat request per training patient with exactly the
messages the vllm backend sends) or receive rationales from a partner lab.
`import_rationales` reads Parquet or JSONL (`patient_id`, `rationale`; optional `diagnosis`,
`model`) or a Batch API output file (`custom_id` = patient id), refuses rows it cannot use
with file, line and patient (not a training patient of this run, another label than the
record's, empty, twice, a failed request), runs the teacher's QC on the rest and writes them
under the stage contract. The file's content digest is part of the identity: distill and
`radiag experiments` use the rows as generated ones, and another file is refused (or, with
`fresh`, supersedes them).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from radiag.cohort.schema import Label
from radiag.cohort.stages import SPLITS_STAGE
from radiag.contract import (
    StageIdentity,
    StageSummary,
    content_digest,
    read_record,
    run_stage,
    upstream_digest,
)
from radiag.errors import UserError
from radiag.outputs import write_part
from radiag.store import RunStore
from radiag.teacher.parsing import parse_answer
from radiag.teacher.prompts import rationalize_messages
from radiag.teacher.stages import RATIONALIZE_STAGE, RECORD_COLUMNS, output_dir, rationale_qc

PART_ROWS = 1000
"""Rows per written part file."""


class RationaleImportError(UserError, ValueError):
    """The file cannot be imported at all (unreadable, no usable row); user-facing."""


def _training_rows(store: RunStore) -> dict[str, dict[str, Any]]:
    """The run's labelled training rows by patient_id: the rows a rationale may explain."""
    table = store.read_table("splits/train.parquet")
    columns = ["patient_id", "description", "label", *RECORD_COLUMNS]
    return {r["patient_id"]: r for r in table.select(columns).to_pylist() if r["label"]}


def batch_file(store: RunStore, model: str, max_tokens: int, version: str = "v1") -> list[dict]:
    """OpenAI Batch API input: one chat completion request per labelled training patient,
    `custom_id` its patient id, the messages those of the rationalize stage."""
    return [
        {
            "custom_id": pid,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": rationalize_messages(row["description"], Label(row["label"]), version),
                "max_tokens": max_tokens,
                "temperature": 0.0,
            },
        }
        for pid, row in sorted(_training_rows(store).items())
    ]


def _file_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number, row) of a Parquet or JSONL file; Batch API output lines become
    rows with the completion's text as the rationale."""
    if path.suffix == ".parquet":
        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
        return
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield number, {"_problem": f"not JSON ({err.msg})"}
                continue
            yield number, _from_batch_output(row) if "custom_id" in row else row


def _from_batch_output(line: dict[str, Any]) -> dict[str, Any]:
    """A Batch API output line as a row: the answer's text, or the failure named."""
    response = line.get("response") or {}
    body = response.get("body") or {}
    if line.get("error") or response.get("status_code") != 200:
        problem = line.get("error") or body.get("error") or f"status {response.get('status_code')}"
        return {"patient_id": line["custom_id"], "_problem": f"the request failed: {problem}"}
    choice = (body.get("choices") or [{}])[0]
    usage = body.get("usage") or {}
    return {
        "patient_id": line["custom_id"],
        "rationale": (choice.get("message") or {}).get("content"),
        "model": body.get("model"),
        "finish_reason": choice.get("finish_reason"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
    }


def _checked(
    row: dict[str, Any], training: dict[str, dict[str, Any]], seen: set[str]
) -> tuple[dict[str, Any] | None, str | None]:
    """The output row for one imported row, or why it is refused."""
    pid = row.get("patient_id")
    if problem := row.get("_problem"):
        return None, problem
    if pid not in training:
        return None, "not a labelled training patient of this run"
    if pid in seen:
        return None, "a second rationale for this patient"
    text = (row.get("rationale") or "").strip()
    if not text:
        return None, "empty rationale"
    parsed = parse_answer(text, row.get("finish_reason"))
    diagnosis = row.get("diagnosis") or (str(parsed.diagnosis) if parsed.diagnosis else None)
    label = training[pid]["label"]
    if diagnosis is not None and diagnosis != label:
        return None, f"explains {diagnosis}, the record's label is {label}"
    reasons = rationale_qc(training[pid], parsed.rationale, diagnosis)
    return {
        "patient_id": pid, "task": "rationalize", "engine": "import",
        "model": row.get("model"), "label_shown": label, "rationale": parsed.rationale,
        "diagnosis": diagnosis, "parse_error": parsed.reason if diagnosis is None else None,
        "qc_flagged": bool(reasons), "qc_reasons": reasons, "attempts": 1,
        "finish_reason": row.get("finish_reason"), "prompt_tokens": row.get("prompt_tokens"),
        "completion_tokens": row.get("completion_tokens"),
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
    }, None  # fmt: skip


def import_rationales(store: RunStore, path: Path, fresh: bool = False) -> StageSummary:
    """Import `path` as the run's rationalize stage output (see the module docstring).

    Raises:
        RationaleImportError: the file is missing, of an unknown format, or has no usable row.
        StageConflict: the run holds other rationales and `fresh` is False.
    """
    if path.suffix not in {".parquet", ".jsonl"}:
        raise RationaleImportError(f"{path}: a .parquet or .jsonl file is needed")
    if not path.is_file():
        raise RationaleImportError(f"{path}: no such file")
    with path.open("rb") as stream:
        identity = StageIdentity(
            stage="rationalize",
            config={"import": {"file": path.name, "format": path.suffix.lstrip(".")}},
            upstream={"splits": upstream_digest(store, SPLITS_STAGE)},
            files={path.name: content_digest(stream)},
        )

    record = read_record(store, RATIONALIZE_STAGE)
    if record is not None and record.fingerprint == identity.fingerprint and record.summary:
        return record.summary  # this file, imported already: nothing to redo

    def body() -> StageSummary:
        training = _training_rows(store)
        rows, refused, seen = [], [], set()
        for number, row in _file_rows(path):
            out, problem = _checked(row, training, seen)
            if out is None:
                refused.append(f"{path.name}:{number}: {row.get('patient_id')}: {problem}")
                continue
            seen.add(out["patient_id"])
            rows.append(out)
        if not rows:
            shown = "; ".join(refused[:3]) or "the file is empty"
            raise RationaleImportError(f"{path}: no row could be imported ({shown})")
        for start in range(0, len(rows), PART_ROWS):
            write_part(store, output_dir("rationalize"), rows[start : start + PART_ROWS])
        flagged = sum(r["qc_flagged"] for r in rows)
        counts = {"imported": len(rows), "refused": len(refused), "qc_flagged": flagged}
        return StageSummary(stage="rationalize", counts=counts, details={"refused": refused})

    return run_stage(store, RATIONALIZE_STAGE, identity, body, fresh)
