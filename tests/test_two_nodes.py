"""`radiag run`, as a user runs it against a cluster, on two Ray nodes of this machine with
the run store on a real S3-compatible server: the head has no CPU, so the teacher's
clients, Ray Data, Ray Train and the student predictors all run on the other node and can
only meet through s3://. Run again, it redoes nothing.

The demo config, smaller: the teacher is the session's OpenAI-compatible stub and there is
no LLM judge (the real vLLM teacher stages and judge are tests/teacher and
tests/evaluation/test_judge.py; the demo's own engine, tests/test_interrupt.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from radiag.store import RunStore

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

CLUSTER = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        worker = cluster.add_node(num_cpus=2)
        print("ADDRESS " + cluster.address, flush=True)
        sys.stdin.readline()  # the test's commands run meanwhile
        ray.init(address=cluster.address, log_to_driver=False)
        placed = [[a.class_name, a.node_id] for a in list_actors(limit=10000, detail=True)]
        print("PLACED " + json.dumps({"worker": worker.node_id, "actors": placed}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


@dataclass(frozen=True)
class TwoNodes:
    """A head without CPUs and a 2-CPU worker node, in a process of their own (this
    process is on the session's cluster): `address` is what commands join."""

    address: str
    process: subprocess.Popen

    def placement(self) -> dict:
        """Every actor's class and node, and the worker node's id; shuts the cluster down."""
        out, _ = self.process.communicate("\n", timeout=120)
        return json.loads(out.split("PLACED ", 1)[1].splitlines()[0])


@pytest.fixture
def two_nodes(tmp_path: Path, restores_current_cluster: None) -> Iterator[TwoNodes]:
    process = subprocess.Popen(
        [sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, env=os.environ | {"RAY_ADDRESS": ""}, cwd=tmp_path,
    )  # fmt: skip
    line = process.stdout.readline()
    assert line.startswith("ADDRESS "), line
    yield TwoNodes(line.split()[1], process)
    if process.poll() is None:
        process.kill()
        process.wait()


def parquet_files(store: RunStore) -> dict[str, int]:
    """Every parquet file of the run -> its modification time."""
    selector = pafs.FileSelector(store.path(""), recursive=True)
    return {
        info.path: info.mtime_ns
        for info in store.fs.get_file_info(selector)
        if info.path.endswith(".parquet")
    }


def test_radiag_run_on_a_worker_node_and_s3_does_every_stage_then_resumes_without_redoing_work(
    two_nodes: TwoNodes,
    s3_endpoint: str,
    stub_teacher: str,
    tiny_model: Path,
    model_cache: Path,
    tmp_path: Path,
) -> None:
    run_dir = f"s3://radiag/two-nodes/{uuid.uuid4().hex[:8]}"
    stub = f"{{backend: openai, base_url: '{stub_teacher}', model: stub}}"
    command = [
        sys.executable, "-m", "radiag.cli", "run", "--config", str(ROOT / "configs" / "demo.yaml"),
        "--set", f"run_dir={run_dir}", "--set", "cohort.synthetic.subjects=80", "--set", "mri.subjects=4",
        "--set", f"rationalize.engine={stub}", "--set", f"diagnose.engine={stub}",
        "--set", "rationalize.limit=6", "--set", "diagnose.limit=4", "--set", "evaluate.judge=null",
        "--set", "students.diagnose={limit: 4, max_new_tokens: 8}",
    ]  # fmt: skip
    for kind in ("text", "vlm"):  # two steps of the tiny model; its random rationales get flagged
        command += [
            "--set", f"students.{kind}.model={{path: {tiny_model}}}",
            "--set", f"students.{kind}.optim={{max_steps: 2, batch_size: 2}}",
            "--set", f"students.{kind}.include_flagged=true",
        ]  # fmt: skip
    env = os.environ | {"RAY_ADDRESS": two_nodes.address, "RADIAG_MODEL_CACHE": str(model_cache)}
    first = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr[-3000:]

    store = RunStore(run_dir)
    manifest = json.loads(store.read_bytes("manifest.json"))
    assert set(manifest["stages"]) == {
        "cohort", "mri", "splits", "rationalize", "diagnose", "baseline",
        "distill-text", "diagnose-student-text", "distill-vlm", "diagnose-student-vlm", "evaluate",
    }  # fmt: skip
    assert manifest["stages"]["rationalize"]["counts"]["rows"] == 6
    assert manifest["stages"]["diagnose"]["counts"]["rows"] == 4
    assert manifest["stages"]["distill-text"]["counts"]["steps"] == 2
    assert manifest["stages"]["diagnose-student-text"]["counts"]["rows"] == 4
    assert manifest["stages"]["mri"]["counts"] == {"volumes": 4, "failed": 0}
    identities = {name: stage["identity"] for name, stage in manifest["stages"].items()}
    assert all(len(identity) == 16 for identity in identities.values())
    assert manifest["precision"]["auto"] in {"bfloat16", "float32"}  # the machine's, recorded
    assert manifest["versions"]["ray"] == "2.60.0" and manifest["seeds"]["split"] == 0
    for written in ("reports/report.html", "splits/test.parquet", "logs/radiag.log",
                    "checkpoints/text/final/student.json", "checkpoints/vlm/final/mri_prefix.pt"):  # fmt: skip
        assert store.exists(written), written
    volumes = store.fs.get_file_info(pafs.FileSelector(store.path("mri"), recursive=True))
    assert len([v for v in volumes if v.path.endswith("_seg.nii.gz")]) == 4
    assert f"report: {store.uri_of('reports/report.html')}" in first.stderr.replace("\n", "")

    written = parquet_files(store)
    assert any("/rationales/part-" in path for path in written)
    second = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert parquet_files(store) == written
    again = json.loads(store.read_bytes("manifest.json"))["stages"]
    assert {name: stage["identity"] for name, stage in again.items()} == identities
    # Quiet by default: one line per stage, not the engines' and Ray's logs.
    lines = [line for line in second.stderr.splitlines() if "smoke run:" not in line]
    assert len(lines) < 40, second.stderr  # smoke-run lines: one per model of the demo's size

    placed = two_nodes.placement()
    working = [node for name, node in placed["actors"]
               if name in {"TeacherWorker", "StudentPredictor", "RayTrainWorker"}]  # fmt: skip
    assert working and set(working) == {placed["worker"]}
    assert not (tmp_path / "runs").exists()  # nothing fell back to the driver's local disk
