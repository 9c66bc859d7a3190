"""A killed teacher job resumes: no finished row is generated again, no row is duplicated.

The driver of `radiag rationalize` is SIGKILLed while it is writing part files; the
rerun must generate exactly the rows that are missing, with the run on local disk or on
an S3-compatible server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from radiag.cohort.describe import DescribeConfig
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
from radiag.cohort.synthetic import SynthConfig
from radiag.store import RunStore
from radiag.teacher.stages import read_output

pytestmark = pytest.mark.slow
ROWS = 24


def rationalize(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "radiag.cli", "rationalize", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the local Ray cluster goes with it
    )


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> RunStore:
    if request.param == "s3":
        request.getfixturevalue("s3_endpoint")
        return RunStore(f"s3://radiag/resume/{uuid.uuid4().hex[:8]}")
    return RunStore(str(tmp_path / "run"))


def part_files(store: RunStore) -> dict[str, int]:
    """Part file -> modification time, wherever the run store is."""
    selector = pafs.FileSelector(store.path("rationales"), allow_not_found=True)
    return {
        info.base_name: info.mtime_ns
        for info in store.fs.get_file_info(selector)
        if info.base_name.startswith("part-") and info.base_name.endswith(".parquet")
    }


def test_a_sigkilled_run_resumes_without_redoing_or_duplicating_rows(
    store: RunStore, tmp_path: Path, tiny_model: Path
) -> None:
    ingest(IngestConfig(synthetic=SynthConfig(subjects=60, max_visits=1)), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": store.uri,
                "rationalize": {
                    "engine": {
                        "model": {"path": str(tiny_model)},
                        "max_model_len": 1024,
                        "cpu_kv_cache_gib": 1,
                        "batch_size": 2,
                    },
                    "sampling": {"temperature": 1.0, "max_tokens": 48},
                    "regeneration_attempts": 0,
                    "limit": ROWS,
                },
                "ray": {"num_cpus": 2},
            }
        )
    )

    first = rationalize(config)
    deadline = time.monotonic() + 300
    while len(part_files(store)) < 2:
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no part file written in time"
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)  # the driver, mid-run
    first.wait()
    time.sleep(2)
    os.killpg(first.pid, signal.SIGKILL)  # then what the driver left behind (Ray, engine)

    written = part_files(store)
    done = read_output(store, "rationalize")["patient_id"].to_pylist()
    assert 0 < len(done) < ROWS and len(done) == len(set(done))

    second = rationalize(config)
    output = second.communicate(timeout=600)[0].decode()
    assert second.returncode == 0, output[-3000:]
    assert f"generated_now={ROWS - len(done)} " in output
    assert f"skipped_done={len(done)} " in output
    assert "INFO" not in output  # quiet console: Ray's and vLLM's logs go to logs/

    final = read_output(store, "rationalize")["patient_id"].to_pylist()
    assert len(final) == ROWS == len(set(final))  # every row once
    assert set(done) <= set(final)
    assert part_files(store).items() >= written.items()  # finished parts are never rewritten
