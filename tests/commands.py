"""`radiag` commands the tests start as subprocesses, to stop or kill them for real."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

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
