"""Jobs on a real Ray head with its job server, submitted as a user would: the `ray job
submit` CLI and `JobSubmissionClient`, with the token authentication that Ray 2.60 turns on
for `ray start --head`. Loopback only."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

SMALL_RUN = {
    "cohort": {"source": "synthetic", "synthetic": {"subjects": 60, "max_visits": 1}},
    "mri": {"subjects": 0},
    "baseline": {"classifiers": ["logistic"], "feature_sets": ["tabular"]},
    "evaluate": {"bootstrap": 50, "judge": None, "rating_sheet_per_model": 2, "examples": 0},
    "ray": {"num_cpus": 2},
}


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout,
        cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def head(restores_current_cluster: None) -> Iterator[dict[str, str]]:
    """`ray start --head` on 127.0.0.1 with the job server; yields the client's environment:
    RAY_ADDRESS of the job server and RAY_AUTH_MODE=token (what docs/cluster.md tells users)."""
    temp = Path("/tmp") / f"rayjobs-{os.getpid()}"  # short: Ray's socket paths have a limit
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    # A head turns token authentication on when the machine has a token: make sure it does.
    assert _ray("get-auth-token", "--generate", env=env).returncode == 0
    dashboard = _port()
    # Every port a head would take by default gets a free one: another Ray on this machine
    # (a test's local cluster) already holds the defaults, and a job agent that cannot bind
    # its port leaves the job server answering "No available agent" forever.
    ports = {
        option: str(_port())
        for option in ("--port", "--dashboard-agent-listen-port", "--ray-client-server-port")
    }
    # --block keeps `ray start` in the foreground: stopping its process group stops this
    # cluster only (`ray stop` would stop every Ray on the machine, other tests' too).
    head_process = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         *(item for pair in ports.items() for item in pair),
         "--dashboard-host", "127.0.0.1", "--dashboard-port",
         str(dashboard), "--num-cpus", "2", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    client = env | {"RAY_ADDRESS": f"http://127.0.0.1:{dashboard}", "RAY_AUTH_MODE": "token"}
    try:
        deadline = time.monotonic() + 300
        # The job agent comes up a few seconds after the head ("No available agent").
        while (tried := _ray("job", "submit", "--", "python", "-c", "pass", env=client)).returncode:
            assert head_process.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, (
                f"the job server never accepted a job: {tried.stderr[-2000:]}"
            )
            time.sleep(3)
        yield client
    finally:
        _stop(head_process, temp)


def _stop(head_process: subprocess.Popen, temp: Path) -> None:
    """SIGTERM to `ray start --block` and its process group, a few seconds to end, then kill
    what is left of this cluster (its processes name the temp dir)."""
    import psutil

    os.killpg(head_process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head_process.wait(timeout=5)  # `ray start --block` often outlives it: killed below
    for process in psutil.process_iter(["cmdline"]):
        if str(temp) in " ".join(process.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                process.kill()
    shutil.rmtree(temp, ignore_errors=True)


def _config(tmp_path: Path, run_dir: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(run_dir), **SMALL_RUN}))
    return path


def test_without_the_token_mode_the_client_is_refused(head: dict[str, str]) -> None:
    env = head | {"RAY_AUTH_MODE": "disabled"}
    listed = _ray("job", "list", env=env, timeout=60)
    assert listed.returncode != 0
    assert "authentication" in (listed.stdout + listed.stderr).lower()


def test_the_pipeline_runs_as_a_job_submitted_with_the_cli(
    head: dict[str, str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    submitted = _ray(
        "job", "submit", "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--",
        "python", "-m", "jobs.run", "--config", str(_config(tmp_path, run_dir)),
        env=head, timeout=600,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "job finished: radiag run exit code 0" in submitted.stdout
    assert f"outputs: {run_dir}" in submitted.stdout  # the log ends with where outputs went
    assert (run_dir / "manifest.json").is_file() and (run_dir / "reports" / "report.html").is_file()


def test_a_relative_run_dir_is_refused_before_the_job_writes_anything(
    head: dict[str, str], tmp_path: Path
) -> None:
    """`runs/x` in a job would land in Ray's temporary copy of the working dir (deleted
    later): the job stops in preflight with exit code 2 and says what to give instead."""
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"run_dir": "runs/job-relative", **SMALL_RUN}))
    submitted = _ray(
        "job", "submit", "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--",
        "python", "-m", "jobs.run", "--config", str(config), env=head, timeout=300,
    )  # fmt: skip
    assert submitted.returncode != 0
    assert "a relative path in a Ray job" in submitted.stdout, submitted.stdout[-3000:]
    assert "job finished: radiag run exit code 2" in submitted.stdout
    assert not (ROOT / "runs" / "job-relative").exists()


SDK_SCRIPT = """
import json, sys, time
from ray.job_submission import JobSubmissionClient

client = JobSubmissionClient()  # RAY_ADDRESS and RAY_AUTH_MODE from the environment
job = client.submit_job(entrypoint=sys.argv[1], runtime_env=json.loads(sys.argv[2]))
deadline = time.monotonic() + 300
while not (status := client.get_job_status(job)).is_terminal():
    assert time.monotonic() < deadline, "job did not finish"
    time.sleep(2)
print(json.dumps({"status": status.value, "logs": client.get_job_logs(job)}))
"""


def test_a_stage_job_from_job_submission_client_reports_status_and_logs(
    head: dict[str, str], tmp_path: Path
) -> None:
    # A script of its own, as a user's would be: Ray reads RAY_AUTH_MODE once per process.
    runtime_env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    entrypoint = (
        f"python -m jobs.rationalize --set run_dir={tmp_path / 'run'} "
        "--set rationalize.engine.backend=openai "
        "--set rationalize.engine.base_url=http://127.0.0.1:9/v1 "
        "--set rationalize.engine.model=m"
    )
    script = subprocess.run(
        [sys.executable, "-c", SDK_SCRIPT, entrypoint,
         json.dumps({**runtime_env, "working_dir": str(ROOT)})],
        env=head, capture_output=True, text=True, timeout=420, cwd=tmp_path,
    )  # fmt: skip
    assert script.returncode == 0, script.stderr[-3000:]
    job = json.loads(script.stdout.splitlines()[-1])
    status, logs = job["status"], job["logs"]
    assert status == "FAILED"  # preflight: exit code 2, before any engine starts
    assert "preflight found problems" in logs and "does not answer" in logs
    assert "job finished: radiag rationalize exit code 2" in logs


def _submitted_id(output: str) -> str:
    return re.findall(r"raysubmit_\w+", output)[0]


def _logs_of_run(run: Path) -> tuple[set[str], set[str]]:
    """The submission ids of the job driver logs in a run's `logs/ray/` and the Ray job ids
    its worker logs name (`worker-<worker id>-<job id>-<pid>.out`), from the head's folder
    (`<node ip>/`, one per node: the files came through Ray's log API)."""
    (folder,) = (run / "logs" / "ray").iterdir()  # this head is the only node
    drivers = {p.name.removeprefix("job-driver-").removesuffix(".log")
               for p in folder.glob("job-driver-*.log")}  # fmt: skip
    return drivers, {p.name.split("-")[2] for p in folder.glob("worker-*")}


@pytest.mark.reliability
def test_a_stopped_job_says_so_a_resubmitted_one_resumes_and_concurrent_jobs_logs_stay_apart(
    head: dict[str, str], tmp_path: Path, slow_teacher: str
) -> None:
    """Two rationalize jobs on two runs at once; `ray job stop` on the first while it
    generates, then the same job submitted again. The stopped job ends STOPPED and says what
    a resubmit does; the resubmit writes only the missing rows, every row once, no finished
    part file rewritten. Each run keeps its own jobs' Ray logs and none of the other's (nor
    of the jobs this head ran before)."""
    from commands import prepare_rationalize_job

    from radiag.teacher.stages import read_output

    rows = 40
    job = prepare_rationalize_job(str(tmp_path / "a"), tmp_path / "a.yaml", slow_teacher, rows)
    other = prepare_rationalize_job(str(tmp_path / "b"), tmp_path / "b.yaml", slow_teacher, 8)
    submit = ("job", "submit", "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml")

    def entry(config: Path) -> tuple[str, ...]:
        return ("--", "python", "-m", "jobs.rationalize", "--config", str(config))

    started = _ray(*submit, "--no-wait", *entry(job.config), env=head)
    beside = _ray(*submit, "--no-wait", *entry(other.config), env=head)
    assert started.returncode == beside.returncode == 0, started.stderr + beside.stderr
    job_id, other_id = _submitted_id(started.stdout), _submitted_id(beside.stdout)

    deadline = time.monotonic() + 300
    while not job.part_files():
        assert time.monotonic() < deadline, _ray("job", "logs", job_id, env=head).stdout[-3000:]
        time.sleep(0.2)
    assert _ray("job", "stop", job_id, env=head).returncode == 0
    assert "was stopped" in _ray("job", "status", job_id, env=head).stdout
    stopped_logs = _ray("job", "logs", job_id, env=head).stdout
    assert "job stopped: radiag rationalize ended by SIGTERM" in stopped_logs, stopped_logs[-3000:]
    assert "resumes from them" in stopped_logs
    finished = job.part_files()
    done = read_output(job.store, "rationalize")["patient_id"].to_pylist()
    assert len(done) == len(set(done)) < rows

    again = _ray(*submit, *entry(job.config), env=head, timeout=420)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"generated_now={rows - len(done)} " in again.stdout
    assert f"skipped_done={len(done)} " in again.stdout
    final = read_output(job.store, "rationalize")["patient_id"].to_pylist()
    assert len(final) == len(set(final)) == rows
    assert job.part_files().items() >= finished.items()

    # `ray job status` ends with "Job '<id>' succeeded" (or "failed", "was stopped").
    while "succeeded" not in (status := _ray("job", "status", other_id, env=head).stdout):
        assert "failed" not in status, _ray("job", "logs", other_id, env=head).stdout[-3000:]
        assert time.monotonic() < deadline + 300, "the job beside it did not finish"
        time.sleep(1)
    drivers, job_ids = _logs_of_run(tmp_path / "a")
    other_drivers, other_job_ids = _logs_of_run(tmp_path / "b")
    assert drivers and drivers <= {job_id, _submitted_id(again.stdout)}, drivers
    assert other_drivers == {other_id}
    assert job_ids and other_job_ids and not job_ids & other_job_ids, (job_ids, other_job_ids)
