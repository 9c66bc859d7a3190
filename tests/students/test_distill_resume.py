"""A killed training run restarts from its last checkpoint and ends with the weights of an
uninterrupted one.

`radiag distill` is SIGKILLed after its first checkpoint; the re-run continues from
`ray.train.get_checkpoint()` instead of step 0 and must restore the optimizer, the dropout
RNG and the data position: any one left out changes the final LoRA weights. The run is on
an S3-compatible server, as on a cluster (Ray Train's checkpoints and the metrics go there
too); the uninterrupted run trains the same config in this process, on local disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors

from radiag.store import RunStore
from radiag.students.config import DistillConfig
from radiag.students.distill import run_distill

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
STEPS = 8


def distill(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "radiag.cli", "distill", "--student", "text", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the local Ray cluster goes with it
    )


@pytest.fixture
def run_store(split_run: Path, s3_endpoint: str) -> RunStore:
    """A private copy of the split run in a bucket."""
    store = RunStore(f"s3://radiag/distill-resume/{uuid.uuid4().hex[:8]}")
    store.upload_dir(split_run, "")
    return store


def adapter_weights(store: RunStore) -> dict[str, torch.Tensor]:
    """The exported student's LoRA weights, as trained (fp32)."""
    return load_safetensors(
        store.read_bytes("checkpoints/text/final/adapter/adapter_model.safetensors")
    )


def test_a_killed_training_run_resumes_and_ends_with_the_weights_of_an_uninterrupted_one(
    run_store: RunStore, fresh_run: RunStore, tiny_model: Path, tmp_path: Path
) -> None:
    config = tmp_path / "distill.yaml"
    student = {
        "model": {"path": str(tiny_model)},
        "optim": {"max_steps": STEPS, "batch_size": 2},
        "lora": {"dropout": 0.3},  # the RNG matters: a mask drawn anew changes the weights
        "checkpoint_every": 2,
        "scaling": {"cpus_per_worker": 0.5},
    }
    config.write_text(
        yaml.safe_dump(
            {"run_dir": run_store.uri, "students": {"text": student}, "ray": {"num_cpus": 2}}
        )
    )
    # Ray Train lists a checkpoint here once it is complete: the restart point.
    registered = "checkpoints/text/train/checkpoint_manager_snapshot.json"

    first = distill(config)
    deadline = time.monotonic() + 300
    while not (run_store.exists(registered) and b"checkpoint_" in run_store.read_bytes(registered)):
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint written in time"
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)  # the driver, mid-training
    first.wait()
    time.sleep(2)
    os.killpg(first.pid, signal.SIGKILL)  # then its Ray cluster and train workers
    assert not run_store.exists("checkpoints/text/final")

    second = distill(config)
    output = second.communicate(timeout=600)[0].decode()
    assert second.returncode == 0, output[-3000:]

    summary = run_store.read_json("checkpoints/text/stage.json")["summary"]
    (resumed_at,) = summary["details"]["resumed_at_steps"]
    assert 2 <= resumed_at < STEPS
    lines = run_store.read_bytes("checkpoints/text/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))

    run_distill("text", DistillConfig.model_validate(student), fresh_run)  # never stopped
    expected, resumed = adapter_weights(fresh_run), adapter_weights(run_store)
    assert resumed.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(resumed[name], expected[name])]
    assert not different, different[:5]
    assert any("lora_B" in name and resumed[name].any() for name in resumed)  # B starts at 0
