"""The run store reads and writes the same way on a local disk and on S3."""

from __future__ import annotations

from pathlib import Path

import boto3
import pyarrow as pa
import pytest

from radiag.cohort.describe import DescribeConfig
from radiag.cohort.readers import read_adnimerge
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
from radiag.cohort.synthetic import SynthConfig
from radiag.contract import StageConflict
from radiag.store import RunStore, storage_failure


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path) -> RunStore:
    if request.param == "local":
        return RunStore(str(tmp_path / "run"))
    request.getfixturevalue("s3_endpoint")
    return RunStore(f"s3://radiag/{tmp_path.name}/run")


def test_tables_json_and_bytes_round_trip(store: RunStore) -> None:
    table = pa.table({"patient_id": ["a", "b"], "x": [1.0, 2.0]})
    store.write_table("stage/t.parquet", table)
    store.write_json("stage/summary.json", {"rows": 2})
    store.write_bytes("stage/volume.nii.gz", b"\x1f\x8bnot-really-gzip")
    assert store.read_table("stage/t.parquet").equals(table)
    assert store.read_json("stage/summary.json") == {"rows": 2}
    assert store.read_bytes("stage/volume.nii.gz") == b"\x1f\x8bnot-really-gzip"  # stored as given
    assert store.exists("stage/t.parquet") and not store.exists("stage/missing.parquet")
    assert store.list_files("stage", suffix=".parquet") == ["stage/t.parquet"]
    assert store.list_files("nowhere") == []


def test_cohort_stages_run_against_the_store(store: RunStore) -> None:
    summary = ingest(IngestConfig(synthetic=SynthConfig(subjects=60)), store)
    splits = describe_and_split(DescribeConfig(), SplitConfig(), store)
    assert summary.counts["subjects"] == 60
    test = store.read_table("splits/test.parquet")
    assert test.num_rows == splits.counts["test_visits"] > 0
    assert all(text.startswith("This patient is a") for text in test["description"].to_pylist())
    assert store.uri_of("splits/test.parquet").startswith(store.uri)


def test_a_finished_stage_is_skipped_and_a_changed_config_is_refused(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path))
    cfg = IngestConfig(synthetic=SynthConfig(subjects=30))
    ingest(cfg, store)
    written = (tmp_path / "cohort" / "cohort.parquet").stat().st_mtime_ns
    ingest(cfg, store)
    assert (tmp_path / "cohort" / "cohort.parquet").stat().st_mtime_ns == written
    with pytest.raises(StageConflict, match=r"changed: config\.synthetic\.subjects\. .*--fresh"):
        ingest(IngestConfig(synthetic=SynthConfig(subjects=31)), store)


def test_an_adnimerge_export_in_s3_is_read_like_a_local_one(s3_endpoint: str) -> None:
    local = Path(__file__).parent / "fixtures" / "ADNIMERGE_quirks.csv"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.put_object(Bucket="radiag", Key="exports/ADNIMERGE.csv", Body=local.read_bytes())
    from_s3 = read_adnimerge("s3://radiag/exports/ADNIMERGE.csv")
    assert from_s3.cohort.equals(read_adnimerge(local).cohort)
    assert set(from_s3.quarantine["file"]) == {"s3://radiag/exports/ADNIMERGE.csv"}


def test_a_storage_failure_is_found_however_ray_wrapped_it() -> None:
    """A part write refused by S3 reaches the driver as RayTaskError -> UserCodeException ->
    OSError; the stage names the store from the OSError at the end of that chain."""
    refused = OSError("When uploading part for key 'bucket/run/rationales/part-1.parquet'")
    in_user_code = ValueError("user code failed")
    in_user_code.__cause__ = refused
    from_the_task = RuntimeError("ray task failed")
    from_the_task.cause = in_user_code  # Ray's exceptions keep theirs as `cause`
    assert storage_failure(from_the_task) is refused
    assert storage_failure(RuntimeError("a bug, not the store")) is None
    remote = RuntimeError("ray::MapWorker() failed\n  File x\nOSError: When testing for bucket 'b'")
    assert str(storage_failure(remote)) == "When testing for bucket 'b'"  # the traceback text
