"""A private copy of the session's split run (tests/conftest.py `split_run`) per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from radiag.store import RunStore


@pytest.fixture
def fresh_run(split_run: Path, tmp_path: Path) -> RunStore:
    """A private copy of the split run (cohort, MRI, splits and rationales)."""
    target = tmp_path / "run"
    shutil.copytree(split_run, target)
    # mri_path values point into the split run: the copy shares its (read-only) volumes.
    return RunStore(str(target))
