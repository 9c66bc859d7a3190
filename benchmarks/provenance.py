"""What a benchmark's results file records about how it was made, so a figure can be traced.

A benchmark takes `load_1min()` when it starts and, when it ends, stores `provenance(that)`:

    started = load_1min()
    ...  # measure
    report |= provenance(started)
    write_results(path, report)  # with the CPU and its precision

`git_commit()` and `machine()` are also there on their own (serving.py stamps each section).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    """`git rev-parse HEAD`, read from .git (no git process)."""
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def load_1min() -> float:
    """The 1-minute load average now: on a shared 2-core machine it says how noisy a run was."""
    return round(os.getloadavg()[0], 2)


def machine() -> dict[str, Any]:
    """Cores, platform, Python, memory and the Ray version (None where Ray is not installed)."""
    try:
        ray = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        ray = None
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "ray": ray,
    }


def utc_timestamp() -> str:
    """Now, in UTC to the second (ISO 8601): every results file dates its figures this way."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def provenance(load_at_start: float) -> dict[str, Any]:
    """The exact command line, the commit, the date (UTC, now: when the figures were
    finished) and the machine, with the 1-minute load average at the start
    (`load_at_start`, from `load_1min()`) and now, at the end.

    Returns:
        {"command": str, "git_commit": str | None, "date": "YYYY-MM-DDTHH:MM:SS+00:00",
        "machine": {..., "load_1min": {"start", "end"}}}
    """
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "git_commit": git_commit(),
        "date": utc_timestamp(),
        "machine": machine() | {"load_1min": {"start": load_at_start, "end": load_1min()}},
    }


def cpu_and_precision() -> dict[str, Any]:
    """The CPU model, its bf16 and AVX flags and the precision `auto` resolves to on it: a
    CPU without native bf16 runs the models in fp32, at another speed."""
    from radiag.precision import NATIVE_BF16_FLAGS, explain, this_cpu, this_machine

    cpu = this_cpu()
    return {
        "cpu_model": cpu.name,
        "native_bf16_flags": sorted(cpu.cpu_flags & NATIVE_BF16_FLAGS),
        "avx2": "avx2" in cpu.cpu_flags,
        "avx512f": "avx512f" in cpu.cpu_flags,
        "precision": explain(*this_machine()),
    }


def write_results(path: Path, report: dict[str, Any]) -> None:
    """Add the CPU and its precision to the report's machine, write it as indented JSON to
    `path` and print it."""
    report["machine"] |= cpu_and_precision()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
