"""The one table shape every generating stage writes: teacher rationales and every
model's predictions (teacher, students, baselines), so evaluation reads them alike.

A stage writes its rows as Parquet part files under its own directory
(`rationales/`, `predictions/<model>/`); each part is written atomically once its
rows are final. A part's name comes from its rows' patient_ids, so a Ray task that
is executed again after it wrote its part (its worker was killed after the write)
rewrites the same file instead of adding a second one; and readers reconcile: a
patient_id in several parts (a retried transient failure) counts once, its newest row.
"""

from __future__ import annotations

import hashlib
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
        ("dtype", pa.string()),  # the precision the model ran in (radiag.precision)
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
        ("transient", pa.bool_()),  # the error may go away (429, 5xx, timeout): retried next run
        ("created_at", pa.string()),
    ]
)


def predictions_dir(model: str) -> str:
    """Where a model's test-split predictions live: `predictions/<model>/`."""
    return f"predictions/{model}"


def part_name(patient_ids: list[str]) -> str:
    """A part file's name from its rows: the same rows always get the same name."""
    key = hashlib.sha256("\n".join(sorted(patient_ids)).encode()).hexdigest()[:20]
    return f"part-{key}.parquet"


def write_part(store: RunStore, directory: str, rows: list[dict[str, Any]]) -> str:
    """Write finished rows as one part file (missing columns become null); returns its path."""
    table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
    path = f"{directory}/{part_name([row['patient_id'] for row in rows])}"
    store.write_table(path, table)
    return path


def failure_counts(table: pa.Table) -> dict[str, int]:
    """Rows that failed (`errors`) and rows that ran but gave no parsable answer (`unparsed`)."""
    unparsed = pc.and_(pc.is_null(table["error"]), pc.is_null(table["diagnosis"]))
    return {
        "errors": pc.sum(pc.is_valid(table["error"])).as_py() or 0,
        "retry_pending": pc.sum(pc.fill_null(table["transient"], False)).as_py() or 0,
        "unparsed": pc.sum(unparsed).as_py() or 0,
    }


def still_to_do(inputs: pa.Table, done: pa.Table) -> pa.Table:
    """Input rows without a final output row: never done, or failed for a transient reason."""
    final = done.filter(pc.invert(pc.fill_null(done["transient"], False)))
    return inputs.filter(pc.invert(pc.is_in(inputs["patient_id"], final["patient_id"])))


def read_parts(store: RunStore, directory: str) -> pa.Table:
    """Every row written so far under `directory` (all part files), or an empty table."""
    parts = store.list_files(directory, suffix=".parquet")
    if not parts:
        return OUTPUT_SCHEMA.empty_table()
    return newest_per_patient(
        pa.concat_tables([_conform(store.read_table(part)) for part in parts])
    )


def newest_per_patient(table: pa.Table) -> pa.Table:
    """One row per patient_id: the one created last (a retry supersedes the failure)."""
    if table.num_rows == len(pc.unique(table["patient_id"])):
        return table
    order = table.sort_by([("patient_id", "ascending"), ("created_at", "descending")])
    ids = order["patient_id"].to_pylist()
    first = [i for i, pid in enumerate(ids) if i == 0 or ids[i - 1] != pid]
    return order.take(first)


def _conform(part: pa.Table) -> pa.Table:
    """A part in the current schema; columns added since it was written are null."""
    missing = [f for f in OUTPUT_SCHEMA if f.name not in part.column_names]
    for field in missing:
        part = part.append_column(field, pa.nulls(part.num_rows, field.type))
    return part.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
