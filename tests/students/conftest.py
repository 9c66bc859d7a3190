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
