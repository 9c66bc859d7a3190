"""Two Ray nodes on this machine and the run store on a real S3-compatible server: the
head (where the driver runs) has no CPU, so the teacher engine, Ray Data, Ray Train and the
student predictors all run on the other node and can only meet through s3://."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from radiag.store import RunStore

pytestmark = pytest.mark.slow

DRIVER = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from radiag.pipeline import RunConfig, run

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        worker = cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address, log_to_driver=False)
        run(RunConfig.model_validate(json.loads(sys.argv[1])))
        placed = [[a.class_name, a.node_id] for a in list_actors(limit=10000, detail=True)]
        print("PLACED " + json.dumps({"worker": worker.node_id, "actors": placed}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


def test_the_pipeline_runs_on_a_second_node_with_the_run_store_on_s3(
    s3_endpoint: str,
    stub_teacher: str,
    tiny_model: Path,
    tmp_path: Path,
    restores_current_cluster: None,
) -> None:
    """The teacher is the session's OpenAI-compatible stub: its client actors must run on
    the worker node like any engine's; the vLLM engine itself is tested in tests/teacher."""
    run_dir = f"s3://radiag/two-nodes/{uuid.uuid4().hex[:8]}"
    tiny = {"path": str(tiny_model)}
    engine = {"backend": "openai", "base_url": stub_teacher, "model": "stub", "batch_size": 8}
    teacher = {"engine": engine, "limit": 8}
    student = {"model": tiny, "optim": {"max_steps": 2, "batch_size": 2}, "include_flagged": True,
               "checkpoint_every": 2, "scaling": {"cpus_per_worker": 0.5}}  # fmt: skip
    cfg = {
        "run_dir": run_dir,
        "cohort": {"synthetic": {"subjects": 40, "max_visits": 1}},
        "mri": {"subjects": 4},
        "rationalize": teacher,
        "diagnose": teacher | {"limit": 4},
        "baseline": {"classifiers": ["logistic"], "feature_sets": ["tabular"]},
        "students": {"text": student, "diagnose": {"limit": 4, "max_new_tokens": 16}},
        "evaluate": {"bootstrap": 50, "judge": None, "rating_sheet_per_model": 2, "examples": 0},
    }
    env = os.environ | {"RAY_ADDRESS": ""}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(cfg)], env=env, capture_output=True,
        text=True, timeout=1500, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    placed = json.loads(done.stdout.split("PLACED ", 1)[1].splitlines()[0])
    working = [node for name, node in placed["actors"]
               if name in {"TeacherWorker", "StudentPredictor", "RayTrainWorker"}]  # fmt: skip
    assert working and set(working) == {placed["worker"]}

    store = RunStore(run_dir)
    for written in ("manifest.json", "reports/report.html", "checkpoints/text/final/student.json"):
        assert store.exists(written), written
    assert store.fs.get_file_info(pafs.FileSelector(store.path("rationales"))), "rationales"
    assert not (tmp_path / "runs").exists()  # nothing fell back to the driver's local disk
