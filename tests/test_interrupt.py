"""A generating `radiag` command, stopped, resumes: one Ctrl-C stops it within seconds
(exit code 130, the part files written before it kept, no Ray worker or vLLM engine left
behind); a SIGKILL of its driver later leaves only whole part files and no engine process
(radiag/reaper.py); the last run generates exactly the rows that are missing, each once.

A real signal can only be sent to a process of its own, so the command runs as a
subprocess; like a user's command, it starts its own local Ray cluster and vLLM engine
(about 30 s, three times) instead of joining the tests' cluster, and those are what must
not outlive it. Its processes are found by an environment variable they all inherit: Ray's
workers and vLLM's engine processes sit in process groups of their own. The run is on local
disk, where a part is written to a temporary file and renamed (a kill can leave the
temporary one); an S3 PUT is whole or absent, and the distill resume test kills a job there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from commands import RationalizeJob

from radiag.store import RunStore
from radiag.teacher.stages import read_output

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
ROWS = 24
MARK = "RADIAG_TEST_COMMAND"


def processes_of(token: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries `MARK=token`."""
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{MARK}={token}".encode() in environ.read_bytes().split(b"\0"):
                cmdline = (environ.parent / "cmdline").read_bytes()
                found[int(environ.parent.name)] = cmdline.replace(b"\0", b" ").decode()
        except OSError:  # ended meanwhile
            continue
    return found


def left_after(token: str, seconds: float) -> dict[int, str]:
    """The command's processes still alive after waiting up to `seconds` for them to end."""
    deadline = time.monotonic() + seconds
    while (alive := processes_of(token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def engine_of(token: str, seconds: float = 60) -> dict[int, str]:
    """The command's vLLM engine-core processes, waiting up to `seconds` for one to show."""
    deadline = time.monotonic() + seconds
    while not (found := {p: c for p, c in processes_of(token).items() if "EngineCore" in c}):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return found


def wait_for_parts(job: RationalizeJob, process: subprocess.Popen, more_than: int) -> None:
    deadline = time.monotonic() + 300
    while len(job.part_files()) <= more_than:
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no part file written in time"
        time.sleep(0.2)


def test_a_generating_command_stopped_by_ctrl_c_then_killed_resumes_without_redoing_rows(
    tmp_path: Path, rationalize_job: Callable[[RunStore, int], RationalizeJob]
) -> None:
    store = RunStore(str(tmp_path / "run"))
    job = rationalize_job(store, ROWS)
    token = uuid.uuid4().hex
    first = job.start(env=os.environ | {MARK: token})
    try:
        wait_for_parts(job, first, more_than=0)
        written = job.part_files()
        assert engine_of(token), "\n".join(processes_of(token).values())  # the scan sees it

        os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C does: the terminal's foreground group
        sent = time.monotonic()
        output = first.communicate(timeout=10)[0].decode()
        took = time.monotonic() - sent
        left = left_after(token, seconds=5)
    finally:
        for pid in processes_of(token):  # a failed test leaves no cluster behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    assert first.returncode == 130, output[-3000:]
    assert took < 10, took
    assert "interrupted: finished batches are kept; rerun the same command to resume" in output
    assert left == {}
    assert job.part_files().items() >= written.items()  # kept, and not rewritten
    done = read_output(store, "rationalize")["patient_id"].to_pylist()  # every part readable
    assert 0 < len(done) < ROWS and len(done) == len(set(done))

    before = len(job.part_files())
    token = uuid.uuid4().hex
    second = job.start(env=os.environ | {MARK: token})
    wait_for_parts(job, second, more_than=before)
    os.kill(second.pid, signal.SIGKILL)  # the driver, mid-run
    second.wait()
    time.sleep(2)
    os.killpg(second.pid, signal.SIGKILL)  # then the local Ray it started, in its group
    orphans = {p: c for p, c in left_after(token, seconds=30).items() if "EngineCore" in c}
    for pid in processes_of(token):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert orphans == {}  # the engine core, in a group of its own, was reaped
    written = job.part_files()
    done = read_output(store, "rationalize")["patient_id"].to_pylist()
    assert 0 < len(done) < ROWS and len(done) == len(set(done))

    third = job.start()
    output = third.communicate(timeout=600)[0].decode()
    assert third.returncode == 0, output[-3000:]
    assert f"generated_now={ROWS - len(done)} " in output
    assert f"skipped_done={len(done)} " in output
    assert "INFO" not in output  # quiet console: Ray's and vLLM's logs go to logs/
    final = read_output(store, "rationalize")["patient_id"].to_pylist()
    assert len(final) == ROWS == len(set(final))  # every row once
    assert set(done) <= set(final)
    assert job.part_files().items() >= written.items()  # finished parts are never rewritten
