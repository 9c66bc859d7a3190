"""The one table shape every generating stage writes: teacher rationales and every
model's predictions (teacher, students, baselines), so evaluation reads them alike.

A stage writes its rows as Parquet part files under its own directory
(`rationales/`, `predictions/<model>/`); each part is written atomically once its
rows are final, so a re-run skips the patient_ids already present and never
writes a duplicate.
"""

from __future__ import annotations

import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from radiag.cohort.schema import Label
from radiag.store import RunStore

PROBABILITY_COLUMNS = {label: f"p_{label}" for label in Label}
"""Class probabilities where a model exposes them (students, baselines); null otherwise."""

OUTPUT_SCHEMA = pa.schema(
    [
        ("patient_id", pa.string()),
        ("task", pa.string()),
        ("prompt_version", pa.string()),
        ("engine", pa.string()),
        ("model", pa.string()),
        ("sampling", pa.string()),  # JSON of the sampling settings, seed included
        ("seed", pa.int64()),
        ("attempts", pa.int64()),
        ("label_shown", pa.string()),  # rationalize only: the label the teacher was given
        ("exemplar_ids", pa.list_(pa.string())),  # few-shot diagnose only
        ("rationale", pa.string()),
        ("diagnosis", pa.string()),
        *[(column, pa.float64()) for column in PROBABILITY_COLUMNS.values()],
        ("parse_error", pa.string()),
        ("qc_flagged", pa.bool_()),
        ("qc_reasons", pa.list_(pa.string())),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("latency_s", pa.float64()),
        ("error", pa.string()),
        ("created_at", pa.string()),
    ]
)


def predictions_dir(model: str) -> str:
    """Where a model's test-split predictions live: `predictions/<model>/`."""
    return f"predictions/{model}"


def write_part(store: RunStore, directory: str, rows: list[dict[str, Any]]) -> None:
    """Write finished rows as one new part file (missing columns become null)."""
    table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
    store.write_table(f"{directory}/part-{uuid.uuid4().hex}.parquet", table)


def failure_counts(table: pa.Table) -> dict[str, int]:
    """Rows that failed (`errors`) and rows that ran but gave no parsable answer (`unparsed`)."""
    unparsed = pc.and_(pc.is_null(table["error"]), pc.is_null(table["diagnosis"]))
    return {
        "errors": pc.sum(pc.is_valid(table["error"])).as_py() or 0,
        "unparsed": pc.sum(unparsed).as_py() or 0,
    }


def read_parts(store: RunStore, directory: str) -> pa.Table:
    """Every row written so far under `directory` (all part files), or an empty table."""
    parts = store.list_files(directory, suffix=".parquet")
    if not parts:
        return OUTPUT_SCHEMA.empty_table()
    return pa.concat_tables([store.read_table(part).cast(OUTPUT_SCHEMA) for part in parts])
