"""Shared fixtures: a real local Ray cluster and a real S3-compatible server.

The suite is tiered like torchtune's: plain `pytest` runs everything, including the
end-to-end tests marked `slow` (they fit CI); `pytest -m "not slow"` skips those.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ray

from radiag.contract import StageIdentity, StageSummary, run_stage
from radiag.outputs import write_part
from radiag.store import RunStore
from radiag.students.config import DistillConfig
from radiag.teacher.stages import RATIONALIZE_STAGE


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str) -> Iterator[None]:
    """One local Ray cluster (2 CPUs, no dashboard) shared by the tests that use Ray.

    Its workers get the S3 server's settings, as a cluster's would from its environment.
    """
    s3_env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": s3_env},
    )
    yield
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible HTTP server on loopback (moto), with a `radiag` bucket.

    Sets AWS_ENDPOINT_URL and dummy credentials, which is how a user points the run
    store at MinIO or any other S3-compatible service.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="radiag")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache with the bundled teacher prepared once for the whole session."""
    from radiag.models import ModelSpec, prepare_model

    cache = tmp_path_factory.mktemp("models")
    prepare_model(ModelSpec(), cache_dir=cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (HF directory) with the bundled teacher's tokenizer and chat template."""
    from radiag.models import ModelSpec, build_tiny_model, prepare_model

    bundled = prepare_model(ModelSpec(), cache_dir=model_cache)  # converted: returned at once
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", bundled)


@pytest.fixture(scope="session")
def write_rationales() -> Callable[[RunStore], None]:
    """Writes rationales in the teacher's output shape for a run's training split, recorded
    as a finished rationalize stage of a fixture identity (the teacher stages are tested in
    tests/teacher); every fifth one is QC-flagged, as the teacher would."""
    return _write_rationales


def _write_rationales(store: RunStore) -> None:
    identity = StageIdentity(stage="rationalize", config={"fixture": "tests"})
    run_stage(store, RATIONALIZE_STAGE, identity, lambda: _rationale_rows(store))


def _rationale_rows(store: RunStore) -> StageSummary:
    rows = [
        {
            "patient_id": row["patient_id"],
            "task": "rationalize",
            "label_shown": row["label"],
            "rationale": f"The MMSE is {row['MMSE']:.0f} and APOE4 count {row['APOE4']:.0f}.",
            "diagnosis": row["label"],
            "qc_flagged": i % 5 == 0,
        }
        for i, row in enumerate(store.read_table("splits/train.parquet").to_pylist())
        if row["label"]
    ]
    write_part(store, "rationales", rows)
    return StageSummary(stage="rationalize", counts={"rows": len(rows)})


StudentFactory = Callable[..., DistillConfig]


@pytest.fixture(scope="session")
def tiny_student(tiny_model: Path) -> StudentFactory:
    """Configs for a few steps of the tiny random Llama with LoRA (seconds per step);
    keyword arguments replace top-level fields."""

    def make(**overrides: object) -> DistillConfig:
        return DistillConfig.model_validate(_TINY_STUDENT | {"model": {"path": str(tiny_model)}}
                                            | overrides)  # fmt: skip

    return make


_TINY_STUDENT = {
    "optim": {"max_steps": 4, "batch_size": 4},
    "checkpoint_every": 2,
    "max_length": 512,
    "mri": {"volumes": {"pixdim_mm": 4.0, "spatial_size": [48, 64, 48]}},
    "scaling": {"cpus_per_worker": 0.5},
}


@pytest.fixture(scope="module")
def restores_current_cluster() -> Iterator[None]:
    """`ray start` and `ray.cluster_utils.Cluster` record their cluster in Ray's
    `ray_current_cluster` file, which every later `ray.init()` on the machine joins: put the
    file back as it was, even when the test's cluster died without cleaning up."""
    record = Path("/tmp/ray/ray_current_cluster")
    before = record.read_text() if record.exists() else None
    yield
    if before is None:
        record.unlink(missing_ok=True)
    else:
        record.write_text(before)
