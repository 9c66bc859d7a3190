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
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import ray
import yaml
from commands import RationalizeJob
from stubs import SlowStubTeacher

from radiag.cohort.describe import DescribeConfig
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
from radiag.cohort.synthetic import SynthConfig
from radiag.config import load_config
from radiag.pipeline import RunConfig
from radiag.store import RunStore
from radiag.teacher.stages import read_output, teacher_stage

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
ROWS = 40


@pytest.fixture(scope="module")
def slow_teacher() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowStubTeacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture
def job(tmp_path: Path, slow_teacher: str, ray_cluster: None) -> RationalizeJob:
    store = RunStore(str(tmp_path / "run"))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=60, max_visits=1)), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    engine = {"backend": "openai", "base_url": slow_teacher, "model": "stub",
              "batch_size": 2, "batches_in_flight": 1, "max_concurrency": 1}  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": store.uri,
                "rationalize": {"engine": engine, "regeneration_attempts": 0, "limit": ROWS},
                "ray": {"address": ray.get_runtime_context().gcs_address},
            }
        )
    )
    return RationalizeJob(store, config)


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


def test_a_killed_engine_actor_is_replaced_and_every_row_written_once(job: RationalizeJob) -> None:
    """The engine's Ray actor SIGKILLed mid-stage (a crash, an OOM kill): Ray Data starts
    another and hands it the unfinished batches; the stage ends with every row once."""
    cfg = load_config(RunConfig, job.config).rationalize
    assert cfg is not None
    outcome: dict[str, object] = {}
    stage = threading.Thread(
        target=lambda: outcome.update(summary=teacher_stage("rationalize", cfg, job.store))
    )
    stage.start()
    deadline = time.monotonic() + 120
    while not job.part_files():
        assert stage.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    (engine,) = [  # Ray names the actor's process after its class
        p
        for p in psutil.process_iter(["cmdline"])
        if "TeacherWorker" in " ".join(p.info["cmdline"] or [])
    ]
    os.kill(engine.pid, signal.SIGKILL)
    stage.join(timeout=300)

    summary = outcome["summary"]
    final = generated(job)
    assert len(final) == len(set(final)) == ROWS
    assert summary.counts["errors"] == 0 and summary.counts["generated_now"] == ROWS
