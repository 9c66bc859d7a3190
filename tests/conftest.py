"""Shared fixtures: a real local Ray cluster and a real S3-compatible server.

The suite is tiered like torchtune's: plain `pytest` runs everything, including the
end-to-end tests marked `slow` (they fit CI); `pytest -m "not slow"` skips those.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import ray
import yaml
from commands import RationalizeJob
from stubs import S3Server, SlowStubTeacher, StubTeacher
from xdist.scheduler import LoadScopeScheduling

from radiag.cohort.describe import DescribeConfig
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
from radiag.cohort.synthetic import SynthConfig
from radiag.contract import StageIdentity, StageSummary, run_stage
from radiag.outputs import write_part
from radiag.store import RunStore
from radiag.students.config import DistillConfig
from radiag.teacher.stages import RATIONALIZE_STAGE

# vLLM on CPU runs its model worker in a third process of its own (engine client, engine
# core, worker), each importing torch and vLLM: about 9 s of every engine start here. The
# tests' engines run the worker inside the engine-core process instead (vLLM's uniprocess
# executor); the local Ray cluster and every command a test starts inherit this. Commands
# users run keep vLLM's default layout.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# Nothing downloads at run time: the suite runs offline, as the jobs do (the one test that
# talks to a Hub endpoint of its own says so in its command's environment).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs two pytest-xdist workers, each a session of its own with its own Ray
# clusters: Ray keeps its sessions and the address `ray.init()` joins under RAY_TMPDIR, so
# each worker gets one (and every process it starts inherits it).
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["RAY_TMPDIR"] = f"/tmp/radiag-tests-{worker}"


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str) -> Iterator[None]:
    """One local Ray cluster (2 CPUs, no dashboard) shared by the tests that use Ray.

    Its workers get the S3 server's settings, as a cluster's would from its environment.
    """
    s3_env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    if ray.is_initialized():  # started on first use by a Ray API an earlier test called
        ray.shutdown()
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
def s3_server() -> Iterator[S3Server]:
    """The session's S3 server, with a `radiag` bucket.

    Sets AWS_ENDPOINT_URL and dummy credentials, which is how a user points the run
    store at MinIO or any other S3-compatible service.
    """
    import boto3

    server = S3Server()
    env = {
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket="radiag")
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_endpoint(s3_server: S3Server) -> str:
    return s3_server.endpoint


def _serve_stub(handler: type[StubTeacher]) -> Iterator[str]:
    """A stub teacher on loopback, in a thread, for the session; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture(scope="session")
def slow_teacher() -> Iterator[str]:
    """An OpenAI-style teacher that takes 0.25 s an answer: a stage is still generating
    whenever a test breaks something under it."""
    yield from _serve_stub(SlowStubTeacher)


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


@pytest.fixture
def rationalize_job(tiny_model: Path, tmp_path: Path) -> Callable[[RunStore, int], RationalizeJob]:
    """Makes a run of 60 synthetic subjects, split, whose config rationalizes `rows` of them
    with the tiny model on a local 2-CPU Ray cluster, two rows per part file, one part at
    a time."""

    def make(store: RunStore, rows: int) -> RationalizeJob:
        ingest(IngestConfig(synthetic=SynthConfig(subjects=60, max_visits=1)), store)
        describe_and_split(DescribeConfig(), SplitConfig(), store)
        # One batch of two rows at a time: parts arrive one by one, so a signal after one
        # of them finds most rows still to generate.
        engine = {"model": {"path": str(tiny_model)}, "max_model_len": 1024,
                  "cpu_kv_cache_gib": 1, "batch_size": 2, "batches_in_flight": 1}  # fmt: skip
        rationalize = {"engine": engine, "sampling": {"temperature": 1.0, "max_tokens": 48},
                       "regeneration_attempts": 0, "limit": rows}  # fmt: skip
        config = tmp_path / "run.yaml"
        config.write_text(
            yaml.safe_dump(
                {"run_dir": store.uri, "rationalize": rationalize, "ray": {"num_cpus": 2}}
            )
        )
        return RationalizeJob(store, config)

    return make


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
    from ray._common.utils import get_ray_address_file

    record = Path(get_ray_address_file(None))
    before = record.read_text() if record.exists() else None
    yield
    if before is None:
        record.unlink(missing_ok=True)
    else:
        record.write_text(before)


# The session's ladder of runs: each rung is built once and shared; a test that writes to a
# run copies it first (`shutil.copytree`: the copy shares the read-only MRI volumes).


@pytest.fixture(scope="session")
def split_run(
    tmp_path_factory: pytest.TempPathFactory,
    ray_cluster: None,
    write_rationales: Callable[[RunStore], None],
) -> Path:
    """40 subjects (one visit each, 16 imaged), described and split, with the fixture's
    rationales: ready for distillation."""
    from radiag.cohort.mri import MriConfig
    from radiag.cohort.stages import synthetic_mri

    root = tmp_path_factory.mktemp("split") / "run"
    store = RunStore(str(root))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=40, max_visits=1)), store)
    synthetic_mri(MriConfig(subjects=16), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    write_rationales(store)
    return root


@pytest.fixture(scope="session")
def trained_run(
    split_run: Path, tmp_path_factory: pytest.TempPathFactory, tiny_student: StudentFactory
) -> Path:
    """`split_run` with logistic baselines, both tiny students (2 steps each) and both
    students' batch diagnosis of three test patients (imaged ones first): a finished run to
    serve or carry over."""
    import shutil

    from radiag.baseline import BaselineConfig, run_baseline
    from radiag.students.config import StudentDiagnoseConfig
    from radiag.students.distill import run_distill
    from radiag.students.predict import run_student_diagnose

    root = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(split_run, root)
    store = RunStore(str(root))
    run_baseline(BaselineConfig(classifiers=["logistic"]), store)
    for kind in ("text", "vlm"):
        run_distill(kind, tiny_student(optim={"max_steps": 2, "batch_size": 4}), store)
    # Short rationales: the served students answer with this config too, so load tests
    # measure the app, not 160 tokens of a random model per request.
    diagnose = StudentDiagnoseConfig(limit=3, batch_size=1, max_new_tokens=16)
    for kind in ("text", "vlm"):  # the served answers are compared with these
        run_student_diagnose(kind, diagnose, store)
    return root


@pytest.fixture(scope="session")
def stub_teacher() -> Iterator[str]:
    """The base URL of a `StubTeacher` on loopback: the teacher stages' OpenAI backend where
    a test is about the pipeline around the teacher, not about the engine (tests/teacher
    runs the real one)."""
    yield from _serve_stub(StubTeacher)


# The order of the session, and what a pytest-xdist worker takes at a time (`make test` runs
# two: most tests wait on process starts). The serving tests come first, as one block that
# shares the served app: those without it, those on it, then those that shut it down to
# deploy their own scaling (test_scaling.py), after which the cluster's CPUs are free again.
# Then the modules with end-to-end (`slow`) tests, then the rest: the long units start early
# and the short ones fill in at the end.
SERVING = Path(__file__).parent / "serving"


def _order(item: pytest.Item, slow_modules: set[Path]) -> tuple[int, int]:
    if item.path.parent == SERVING:
        if item.path.name == "test_scaling.py":
            return 0, 2
        return 0, 1 if "served_app" in getattr(item, "fixturenames", ()) else 0
    return (1 if item.path in slow_modules else 2), 0


# The first test on the session's trained run or served app also builds them (minutes,
# more while the other worker trains): its time limit covers that.
BUILDS_THE_SESSIONS_RUN = {"trained_run", "served_app"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: _order(item, slow_modules))  # stable: module order is kept
    for item in items:
        uses = BUILDS_THE_SESSIONS_RUN & set(getattr(item, "fixturenames", ()))
        if uses and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(1200))


class ModuleScheduling(LoadScopeScheduling):
    """A unit of work is a test module (its module-scoped fixtures are built once), or all
    the serving tests (one served app per worker would cost minutes), in collection order."""

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        return "tests/serving" if module.startswith("tests/serving/") else module


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> ModuleScheduling:
    config.option.loadscopereorder = False  # the order above, not the largest module first
    return ModuleScheduling(config, log)


# The reliability suite's table (tests/reliability/README.md): one row per module of tests
# marked `reliability`, what it tried (its docstring's first line), its cases and how many
# held. Only a run of the whole suite writes it: one with -m or -k, or of some files only,
# leaves it alone (it would shrink the table to what ran).
RELIABILITY_TABLE = Path(__file__).parent / "reliability" / "README.md"
_reliability_outcomes: dict[str, dict[str, bool]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "reliability" not in report.keywords:
        return
    module = report.nodeid.split("::", 1)[0]
    held = _reliability_outcomes.setdefault(module, {})
    if report.when == "call" or not report.passed:
        held[report.nodeid] = held.get(report.nodeid, True) and report.passed


def pytest_sessionfinish(session: pytest.Session) -> None:
    options = session.config.option
    whole_suite = session.config.args_source is pytest.Config.ArgsSource.TESTPATHS
    if (
        not _reliability_outcomes
        or os.environ.get("PYTEST_XDIST_WORKER")  # saw its own tests only: the controller writes
        or not whole_suite  # a run of some files would shrink the table to them
        or options.markexpr
        or options.keyword
        or getattr(options, "lf", False)
    ):
        return
    rows = []
    for module, cases in sorted(_reliability_outcomes.items()):
        doc = session.config.rootpath / module
        title = _docstring_title(doc)
        rows.append(f"| `{module}` | {title} | {len(cases)} | {sum(cases.values())} |")
    RELIABILITY_TABLE.write_text(
        "# Reliability suite\n\n"
        "Written by the last run of the tests without -m or -k (`make test`), not by hand: each\n"
        "row is a module of tests marked `reliability`, what it tried, its cases, and how many\n"
        "held.\n\n"
        "| tests | what was tried | cases | held |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def _docstring_title(module: Path) -> str:
    """The first paragraph of a test module's docstring."""
    import ast

    doc = ast.get_docstring(ast.parse(module.read_text())) or module.stem
    return " ".join(doc.split("\n\n")[0].split()).replace("|", "/")
