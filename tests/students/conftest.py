"""A run ready for distillation: cohort, synthetic T1s, splits and teacher rationales
(`write_rationales` of tests/conftest.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from radiag.cohort.describe import DescribeConfig
from radiag.cohort.mri import MriConfig
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest, synthetic_mri
from radiag.cohort.synthetic import SynthConfig
from radiag.store import RunStore
from radiag.students.config import DistillConfig


@pytest.fixture(scope="session")
def prepared_run(
    tmp_path_factory: pytest.TempPathFactory,
    ray_cluster: None,
    write_rationales: Callable[[RunStore], None],
) -> Path:
    """40 subjects, 16 of them imaged; copy it before changing it (`fresh_run`)."""
    root = tmp_path_factory.mktemp("students") / "run"
    store = RunStore(str(root))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=40, max_visits=1)), store)
    synthetic_mri(MriConfig(subjects=16), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    write_rationales(store)
    return root


@pytest.fixture
def fresh_run(prepared_run: Path, tmp_path: Path) -> RunStore:
    """A private copy of the prepared run (cohort, MRI, splits and rationales)."""
    target = tmp_path / "run"
    shutil.copytree(prepared_run, target)
    # mri_path values point into the prepared run: the copy shares its (read-only) volumes.
    return RunStore(str(target))


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
