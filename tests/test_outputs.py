"""The shared output table: deterministic part files, reconciled reads, transient retries."""

from __future__ import annotations

import datetime
import os
import signal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray

from radiag.outputs import (
    OUTPUT_SCHEMA,
    failure_counts,
    part_name,
    read_parts,
    still_to_do,
    write_part,
)
from radiag.store import RunStore

DIRECTORY = "predictions/model"


def row(patient_id: str, created_at: str = "2024-01-01T00:00:00", **fields: Any) -> dict[str, Any]:
    return {"patient_id": patient_id, "created_at": created_at, **fields}


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(str(tmp_path / "run"))


def test_a_part_is_named_by_its_patient_ids_in_any_order() -> None:
    assert part_name(["b", "a", "c"]) == part_name(["a", "c", "b"])
    assert part_name(["a", "b"]) != part_name(["a", "c"])
    assert part_name(["a", "b"]).startswith("part-") and part_name(["a"]).endswith(".parquet")


def test_writing_the_same_rows_again_rewrites_the_same_part(store: RunStore) -> None:
    first = write_part(store, DIRECTORY, [row("a"), row("b")])
    again = write_part(store, DIRECTORY, [row("b", "2024-01-02"), row("a", "2024-01-02")])
    assert first == again
    assert store.list_files(DIRECTORY) == [first]
    assert read_parts(store, DIRECTORY)["created_at"].to_pylist() == ["2024-01-02"] * 2


@pytest.mark.parametrize("newest_in", ["part-0", "part-1"])
def test_a_patient_in_two_parts_is_read_once_its_newest_row(
    store: RunStore, newest_in: str
) -> None:
    """A transient failure retried next run leaves the failed row in an older part."""
    failed = [row("a", error="429", transient=True), row("b", diagnosis="CN")]
    retried = [row("a", "2024-01-02T00:00:00", diagnosis="AD")]
    older, newer = ("part-1", "part-0") if newest_in == "part-0" else ("part-0", "part-1")
    store.write_table(f"{DIRECTORY}/{older}.parquet", pa.Table.from_pylist(failed, OUTPUT_SCHEMA))
    store.write_table(f"{DIRECTORY}/{newer}.parquet", pa.Table.from_pylist(retried, OUTPUT_SCHEMA))
    table = read_parts(store, DIRECTORY).sort_by("patient_id")
    assert table.schema == OUTPUT_SCHEMA
    assert table["patient_id"].to_pylist() == ["a", "b"]
    assert table["diagnosis"].to_pylist() == ["AD", "CN"]
    assert failure_counts(table)["retry_pending"] == 0


def test_an_empty_directory_reads_as_an_empty_table_in_the_output_schema(store: RunStore) -> None:
    table = read_parts(store, DIRECTORY)
    assert table.num_rows == 0 and table.schema == OUTPUT_SCHEMA


def test_transient_failures_are_done_again_and_permanent_ones_are_not() -> None:
    inputs = pa.table({"patient_id": ["done", "transient", "permanent", "legacy", "new"]})
    done = pa.Table.from_pylist(
        [
            row("done", diagnosis="MCI", transient=False),
            row("transient", error="HTTP 503", transient=True),
            row("permanent", error="missing description", transient=False),
            row("legacy", error="prompt too long"),  # written before `transient` existed
        ],
        OUTPUT_SCHEMA,
    )
    assert still_to_do(inputs, done)["patient_id"].to_pylist() == ["transient", "new"]
    counts = failure_counts(done)
    assert (counts["errors"], counts["retry_pending"]) == (3, 1)


@ray.remote(max_retries=2)
def write_then_die_once(store_uri: str, rows: list[dict[str, Any]], attempts: str) -> str:
    """Write the part, then on the first attempt kill this worker before returning."""
    marker = Path(attempts)
    done_before = marker.read_text() if marker.exists() else ""
    marker.write_text(done_before + f"{os.getpid()}\n")
    stamped = [r | {"created_at": datetime.datetime.now(datetime.UTC).isoformat()} for r in rows]
    path = write_part(RunStore(store_uri), DIRECTORY, stamped)
    if not done_before:
        os.kill(os.getpid(), signal.SIGKILL)
    return path


def test_a_task_ray_executes_again_after_it_wrote_rewrites_its_part(
    store: RunStore, tmp_path: Path, ray_cluster: None
) -> None:
    rows = [row(f"p{i}", diagnosis="CN") for i in range(5)]
    attempts = tmp_path / "attempts.txt"
    path = ray.get(write_then_die_once.remote(store.uri, rows, str(attempts)), timeout=120)

    pids = attempts.read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1]  # Ray ran it again in a new worker
    assert store.list_files(DIRECTORY) == [path]
    assert store.read_table(path).num_rows == len(rows)
    ids = read_parts(store, DIRECTORY)["patient_id"]
    assert len(ids) == len(rows) == len(pc.unique(ids))
