"""A finished run (splits, baselines, both tiny students) and the real Serve app over it,
on 127.0.0.1 of the session's local Ray cluster, reached with real HTTP clients."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from radiag.baseline import BaselineConfig, run_baseline
from radiag.cohort.describe import DescribeConfig
from radiag.cohort.mri import MriConfig
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest, synthetic_mri
from radiag.cohort.synthetic import SynthConfig
from radiag.store import RunStore
from radiag.students.distill import run_distill

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


@pytest.fixture(scope="session")
def served_run(
    tmp_path_factory: pytest.TempPathFactory,
    ray_cluster: None,
    tiny_student: Callable[..., Any],
    write_rationales: Callable[[RunStore], None],
) -> Path:
    """40 synthetic subjects (16 imaged), baselines, two students of a few steps each, and
    the text student's batch diagnosis of three test patients."""
    from radiag.students.config import StudentDiagnoseConfig
    from radiag.students.predict import run_student_diagnose

    root = tmp_path_factory.mktemp("serving") / "run"
    store = RunStore(str(root))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=40, max_visits=1)), store)
    synthetic_mri(MriConfig(subjects=16), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    write_rationales(store)
    run_baseline(BaselineConfig(classifiers=["logistic"]), store)
    for kind in ("text", "vlm"):
        run_distill(kind, tiny_student(optim={"max_steps": 2, "batch_size": 4}), store)
    # The batch answers the endpoint is compared with (before Serve holds any CPU).
    run_student_diagnose("text", StudentDiagnoseConfig(limit=3, batch_size=1), store)
    return root


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


@pytest.fixture(scope="module")
def served_app(served_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    """The app over a private copy of the run (some tests hot-swap or write to it)."""
    from ray import serve

    run = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(served_run, run)
    limits = {"allowed_mri_prefixes": [str(run / "mri")], "max_upload_mb": 4}
    url = start_app(run, {"limits": limits})
    yield ServedApp(url, TOKEN, run)
    serve.shutdown()
