"""The real Serve app over the session's trained run (tests/conftest.py `trained_run`), on
127.0.0.1 of the session's local Ray cluster, reached with real HTTP clients."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

TOKEN = "test-token-0123456789abcdef"


@dataclass(frozen=True)
class ServedApp:
    url: str
    token: str
    run: Path

    def client(self, token: str | None = TOKEN, timeout: float = 120) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(run: Path, args: dict | None = None) -> str:
    """The app deployed as `serve deploy` does, on a fresh port; returns its base URL. The
    token is a file, as on a cluster: the app is built in a Ray task, not in this process."""
    from radiag.serving.app import deploy
    from radiag.serving.config import ServeConfig

    token_file = run.parent / "serve-token"
    token_file.write_text(TOKEN + "\n")
    cfg = ServeConfig.model_validate({"run_dir": str(run), "token_file": str(token_file)}
                                     | (args or {}))  # fmt: skip
    return deploy(cfg, port=free_port())


@pytest.fixture(scope="session")
def served_app(
    trained_run: Path, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedApp]:
    """The whole app, teacher included, started by the README's command, `radiag serve --run
    RUN --teacher`, joined to the session's 2-CPU cluster with the token as a file (as on a
    cluster) and with no CPU settings: the command must fit the app to the cluster itself.

    It serves a private copy of the run (some tests hot-swap or write to it) whose teacher
    diagnosed two test patients in the batch stage. The API, page and teacher tests share
    it and run last in the session; the tests that need other scaling shut it down to
    deploy their own (they run after them)."""
    import ray
    from ray import serve

    from radiag.store import RunStore
    from radiag.teacher.engines import SamplingConfig, VllmEngineConfig
    from radiag.teacher.stages import DiagnoseConfig, teacher_stage

    run = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(trained_run, run)
    sampling = SamplingConfig(max_tokens=48, repetition_penalty=1.2)
    diagnose = DiagnoseConfig(engine=VllmEngineConfig(batch_size=2), sampling=sampling, limit=2)
    teacher_stage("diagnose", diagnose, RunStore(str(run)))
    token_file = run.parent / "serve-token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    command = [
        sys.executable, "-m", "radiag.cli", "serve", "--run", str(run), "--teacher",
        "--port", str(port), "--address", ray.get_runtime_context().gcs_address,
        "--set", f"token_file={token_file}",
        "--set", f"limits.allowed_mri_prefixes=[{run / 'mri'}]", "--set", "limits.max_upload_mb=4",
    ]  # fmt: skip
    env = os.environ | {"RADIAG_MODEL_CACHE": str(model_cache)}
    command_line = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    output = []
    for line in command_line.stdout:  # until the command says it serves, or ends
        output.append(line)
        if line.startswith("serving:"):
            break
    assert command_line.poll() is None, "".join(output)[-3000:]
    yield ServedApp(f"http://127.0.0.1:{port}", TOKEN, run)
    command_line.terminate()
    command_line.communicate(timeout=60)
    serve.shutdown()
