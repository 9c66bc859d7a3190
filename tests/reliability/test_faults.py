"""Faults while a teacher stage generates: its command SIGKILLed at random moments (three
seeds) then run to the end, or its engine actor killed: every row generated exactly once,
none lost, and no part file finished before a kill rewritten.

The command joins the session's Ray cluster (a kill then costs its driver, not a cluster
start) and asks a slow stub teacher (0.25 s an answer, one at a time), so each kill lands
mid-stage; the real engine's kill and Ctrl-C are tests/test_interrupt.py.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
from commands import RationalizeJob, prepare_rationalize_job
from stubs import S3Server

from radiag.config import load_config
from radiag.contract import StageSummary
from radiag.pipeline import RunConfig
from radiag.store import StoreUnreachable
from radiag.teacher.stages import read_output, teacher_stage

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
ROWS = 40


def prepare_job(run_dir: str, tmp_path: Path, slow_teacher: str) -> RationalizeJob:
    """The job's command joins the session's cluster: a kill costs its driver only."""
    ray_settings = {"address": ray.get_runtime_context().gcs_address}
    return prepare_rationalize_job(run_dir, tmp_path / "run.yaml", slow_teacher, ROWS, ray_settings)


@pytest.fixture
def job(tmp_path: Path, slow_teacher: str, ray_cluster: None) -> RationalizeJob:
    return prepare_job(str(tmp_path / "run"), tmp_path, slow_teacher)


@pytest.fixture
def s3_job(tmp_path: Path, slow_teacher: str, ray_cluster: None) -> RationalizeJob:
    return prepare_job(f"s3://radiag/faults-{tmp_path.name}", tmp_path, slow_teacher)


def generated(job: RationalizeJob) -> list[str]:
    return read_output(job.store, "rationalize")["patient_id"].to_pylist()


@pytest.mark.parametrize("seeds", [(0, 1, 2)])
def test_random_kills_lose_nothing_duplicate_nothing_and_redo_nothing(
    job: RationalizeJob, seeds: tuple[int, ...]
) -> None:
    finished: dict[str, int] = {}
    for seed in seeds:
        command = job.start(env=os.environ | {"OPENAI_API_KEY": "unused"})
        while len(job.part_files()) <= len(finished):  # generating again
            assert command.poll() is None, command.stdout.read().decode()[-3000:]
            time.sleep(0.05)
        time.sleep(random.Random(seed).uniform(0.0, 1.5))  # somewhere mid-stage
        os.killpg(command.pid, signal.SIGKILL)
        command.wait()
        done = generated(job)  # every part file whole and readable
        assert len(done) == len(set(done)) < ROWS, seed
        assert job.part_files().items() >= finished.items(), seed  # none rewritten
        finished = job.part_files()

    last = job.start(env=os.environ | {"OPENAI_API_KEY": "unused"})
    output = last.communicate(timeout=300)[0].decode()
    assert last.returncode == 0, output[-3000:]
    assert f"generated_now={ROWS - len(done)} " in output and f"skipped_done={len(done)} " in output
    final = generated(job)
    assert len(final) == len(set(final)) == ROWS and set(done) <= set(final)
    assert job.part_files().items() >= finished.items()


class StageThread(threading.Thread):
    """The job's rationalize stage run in this process, in a thread, so that the test can
    break something under it; `result()` is its summary or raises what it raised."""

    def __init__(self, job: RationalizeJob) -> None:
        super().__init__()
        self.job, self.summary, self.error = job, None, None

    def run(self) -> None:
        cfg = load_config(RunConfig, self.job.config).rationalize
        assert cfg is not None
        try:
            self.summary = teacher_stage("rationalize", cfg, self.job.store)
        except Exception as err:  # the test decides what is allowed
            self.error = err

    def wait_for_first_part(self) -> None:
        deadline = time.monotonic() + 120
        while not self.job.part_files():
            assert self.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)

    def result(self) -> StageSummary:
        self.join(timeout=300)
        assert not self.is_alive(), "the stage did not end"
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


def of_this_session(process: psutil.Process) -> bool:
    """Started by this test session's Ray cluster, not by another pytest-xdist worker's
    (each worker's processes inherit its RAY_TMPDIR)."""
    try:
        return process.environ().get("RAY_TMPDIR") == os.environ.get("RAY_TMPDIR")
    except psutil.Error:  # ended meanwhile, or not ours to read
        return False


def test_a_killed_engine_actor_is_replaced_and_every_row_written_once(job: RationalizeJob) -> None:
    """The engine's Ray actor SIGKILLed mid-stage (a crash, an OOM kill): Ray Data starts
    another and hands it the unfinished batches; the stage ends with every row once."""
    stage = StageThread(job)
    stage.start()
    stage.wait_for_first_part()
    (engine,) = [  # Ray names the actor's process after its class
        p
        for p in psutil.process_iter(["cmdline"])
        if "TeacherWorker" in " ".join(p.info["cmdline"] or []) and of_this_session(p)
    ]
    os.kill(engine.pid, signal.SIGKILL)

    summary = stage.result()
    final = generated(job)
    assert len(final) == len(set(final)) == ROWS
    assert summary.counts["errors"] == 0 and summary.counts["generated_now"] == ROWS


def test_an_s3_outage_mid_stage_loses_and_duplicates_nothing(
    s3_job: RationalizeJob, s3_server: S3Server
) -> None:
    """The S3 server holding the run goes away for 5 s mid-stage and comes back. The stage
    either rides it out (the S3 client retries) or stops with one line naming the store;
    run again, it writes only the missing rows: every row once, no finished part file
    rewritten."""
    stage = StageThread(s3_job)
    stage.start()
    stage.wait_for_first_part()
    s3_server.restart(down_s=5)
    before = s3_job.part_files()
    try:
        first = stage.result()
        print("rode out the outage:", first.counts)
    except StoreUnreachable as err:  # stopping is allowed too, with one line that says why
        print("stopped by the outage:", err)
        assert s3_job.store.uri in str(err) and "run the same command again" in str(err)
    done = generated(s3_job)
    assert len(done) == len(set(done))

    again = StageThread(s3_job)
    again.start()
    summary = again.result()
    final = generated(s3_job)
    assert len(final) == len(set(final)) == ROWS
    assert summary.counts["generated_now"] == ROWS - len(done)
    assert s3_job.part_files().items() >= before.items()  # none rewritten
