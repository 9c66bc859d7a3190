"""`radiag` commands the tests start as subprocesses, to stop or kill them for real."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import yaml

from radiag.cohort.describe import DescribeConfig
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
from radiag.cohort.synthetic import SynthConfig
from radiag.store import RunStore


@dataclass(frozen=True)
class RationalizeJob:
    """`radiag rationalize` of a prepared run, for the tests that kill or interrupt it."""

    store: RunStore
    config: Path

    def start(self, env: dict[str, str] | None = None) -> subprocess.Popen:
        """The command in a session of its own: its group holds its local Ray cluster."""
        return subprocess.Popen(
            [sys.executable, "-m", "radiag.cli", "rationalize", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )

    def part_files(self) -> dict[str, int]:
        """Part file -> modification time, wherever the run store is."""
        selector = pafs.FileSelector(self.store.path("rationales"), allow_not_found=True)
        try:
            found = self.store.fs.get_file_info(selector)
        except FileNotFoundError:  # the stage is (re)creating its folder right now
            return {}
        return {
            info.base_name: info.mtime_ns
            for info in found
            if info.base_name.startswith("part-") and info.base_name.endswith(".parquet")
        }


def prepare_rationalize_job(
    run_dir: str, config: Path, teacher_url: str, rows: int, ray: dict | None = None
) -> RationalizeJob:
    """A split run of 60 synthetic subjects whose rationalize stage asks the OpenAI-style
    teacher at `teacher_url` for `rows` rationales, one at a time in batches of two (so a
    slow teacher is still generating whenever a test breaks something)."""
    store = RunStore(run_dir)
    ingest(IngestConfig(synthetic=SynthConfig(subjects=60, max_visits=1)), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    engine = {"backend": "openai", "base_url": teacher_url, "model": "stub",
              "batch_size": 2, "batches_in_flight": 1, "max_concurrency": 1}  # fmt: skip
    rationalize = {"engine": engine, "regeneration_attempts": 0, "limit": rows}
    body = {"run_dir": store.uri, "rationalize": rationalize} | ({"ray": ray} if ray else {})
    config.write_text(yaml.safe_dump(body))
    return RationalizeJob(store, config)
