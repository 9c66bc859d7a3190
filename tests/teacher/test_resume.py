"""A killed teacher job resumes: no finished row is generated again, no row is duplicated.

The driver of `radiag rationalize` is SIGKILLed while it is writing part files; the
rerun must generate exactly the rows that are missing. The run is on an S3-compatible
server; the same command on local disk, stopped by Ctrl-C and rerun, is
tests/test_interrupt.py (each costs two engine starts, so each store is proven once).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable

import pytest

from radiag.store import RunStore
from radiag.teacher.stages import read_output

pytestmark = pytest.mark.slow
ROWS = 24


@pytest.fixture
def store(s3_endpoint: str) -> RunStore:
    return RunStore(f"s3://radiag/resume/{uuid.uuid4().hex[:8]}")


def test_a_sigkilled_run_resumes_without_redoing_or_duplicating_rows(
    store: RunStore, rationalize_job: Callable
) -> None:
    job = rationalize_job(store, ROWS)
    first = job.start()
    deadline = time.monotonic() + 300
    while len(job.part_files()) < 2:
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no part file written in time"
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)  # the driver, mid-run
    first.wait()
    time.sleep(2)
    os.killpg(first.pid, signal.SIGKILL)  # then what the driver left behind (Ray, engine)

    written = job.part_files()
    done = read_output(store, "rationalize")["patient_id"].to_pylist()
    assert 0 < len(done) < ROWS and len(done) == len(set(done))

    second = job.start()
    output = second.communicate(timeout=600)[0].decode()
    assert second.returncode == 0, output[-3000:]
    assert f"generated_now={ROWS - len(done)} " in output
    assert f"skipped_done={len(done)} " in output
    assert "INFO" not in output  # quiet console: Ray's and vLLM's logs go to logs/

    final = read_output(store, "rationalize")["patient_id"].to_pylist()
    assert len(final) == ROWS == len(set(final))  # every row once
    assert set(done) <= set(final)
    assert job.part_files().items() >= written.items()  # finished parts are never rewritten
