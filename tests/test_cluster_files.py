"""The cluster and job files, checked offline.

No cloud or Kubernetes is reachable from here, so nothing in `cluster/` is launched:
each file is parsed, checked against Ray's own launcher schema where Ray ships one,
and against the KubeRay v1 field names otherwise (cluster/README.md says the same).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
YAML_FILES = sorted(
    path.relative_to(ROOT)
    for folder in ("cluster", "jobs")
    for path in (ROOT / folder).rglob("*.y*ml")
)
AWS = ROOT / "cluster" / "aws.yaml"
RAYCLUSTER = ROOT / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = ROOT / "cluster" / "kuberay" / "rayjob.yaml"
RUNTIME_ENV = ROOT / "jobs" / "runtime_env.yaml"

# json tags of ray-operator/apis/ray/v1/{rayjob,raycluster}_types.go (KubeRay v1).
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
}  # fmt: skip
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


def _documents(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _one(path: Path, kind: str) -> dict[str, Any]:
    found = [doc for doc in _documents(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def test_the_expected_files_exist() -> None:
    assert {AWS, RAYCLUSTER, RAYJOB, RUNTIME_ENV} <= {ROOT / p for p in YAML_FILES}


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


def test_aws_config_passes_the_ray_launcher_schema() -> None:
    # What `ray up` does before it calls AWS: merge the provider defaults, then validate
    # against ray/autoscaler/ray-schema.json (rejects unknown or misspelt keys).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_documents(AWS)[0]))


def test_raycluster_uses_kuberay_v1_fields_and_requests_gpus() -> None:
    cluster = _one(RAYCLUSTER, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(cluster["spec"])


def _check_cluster_spec(spec: dict[str, Any]) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_FIELDS
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"], "the head is a CPU pod"
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, group["groupName"]
        assert group["minReplicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            gpu_groups.append(limits["nvidia.com/gpu"])
    assert gpu_groups == ["1"]


def test_rayjob_runs_jobs_run_with_an_existing_config() -> None:
    job = _one(RAYJOB, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.run"]
    config = argv[argv.index("--config") + 1]
    assert config.startswith("configs/") and (ROOT / config).is_file(), config
    _check_cluster_spec(spec["rayClusterSpec"])


def test_rayjob_and_raycluster_describe_the_same_cluster() -> None:
    cluster = _one(RAYCLUSTER, "RayCluster")["spec"]
    assert _one(RAYJOB, "RayJob")["spec"]["rayClusterSpec"] == cluster


def test_rayjob_runtime_env_is_jobs_runtime_env_plus_working_dir() -> None:
    runtime_env = yaml.safe_load(_one(RAYJOB, "RayJob")["spec"]["runtimeEnvYAML"])
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


def test_jobs_run_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jobs.run", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
    assert "--config" in result.stdout
