"""The real Serve app over the session's trained run (tests/conftest.py `trained_run`), on
127.0.0.1 of the session's local Ray cluster, reached with real HTTP clients."""

from __future__ import annotations

import shutil
import socket
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
def served_app(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    """The app over a private copy of the run (some tests hot-swap or write to it), deployed
    once for the session's API and page tests; tests that need other scaling redeploy."""
    from ray import serve

    run = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(trained_run, run)
    limits = {"allowed_mri_prefixes": [str(run / "mri")], "max_upload_mb": 4}
    url = start_app(run, {"limits": limits})
    yield ServedApp(url, TOKEN, run)
    serve.shutdown()
