"""Benchmark: 1,000,000 synthetic patients generated, canonicalised and described.

Goal (issue: foundation): under 60 s on a 2-core machine. The path is the one a run
takes: the ADNIMERGE-shaped table from the generator goes through the same
canonicalisation (typing, labels, range checks, quarantine) as a real export,
then every row gets its paper-style description. Baseline visits only, so
patients = rows. Writes benchmarks/results/cohort.json.

    python benchmarks/cohort_scale.py [--subjects 1000000]
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from radiag.cohort.describe import DescribeConfig, describe
from radiag.cohort.mapping import bundled_mapping
from radiag.cohort.synthetic import SynthConfig, generate_cohort
from radiag.cohort.validate import canonicalize

RESULTS = Path(__file__).parent / "results" / "cohort.json"


def main(subjects: Annotated[int, typer.Option(help="patients to generate")] = 1_000_000) -> None:
    timings = {}
    start = time.perf_counter()
    raw = generate_cohort(SynthConfig(subjects=subjects, max_visits=1, seed=0))
    timings["generate_s"] = time.perf_counter() - start

    mark = time.perf_counter()
    raw["_file"] = "synthetic"
    raw["_row"] = np.arange(2, len(raw) + 2)
    result = canonicalize(raw, bundled_mapping("adnimerge"))
    timings["canonicalize_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    described = describe(result.cohort, DescribeConfig())
    timings["describe_s"] = time.perf_counter() - mark
    total = time.perf_counter() - start

    report = {
        "benchmark": "synthetic cohort: generate + canonicalise + describe",
        "subjects": subjects,
        "rows_described": described.num_rows,
        "rows_quarantined": int(result.quarantine[["file", "row"]].drop_duplicates().shape[0]),
        f"seconds_{subjects // 1_000_000}m" if subjects % 1_000_000 == 0 else "seconds": round(
            total, 2
        ),
        **{k: round(v, 2) for k, v in timings.items()},
        "rows_per_second": round(described.num_rows / total),
        "goal_seconds_1m": 60,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "example": described["description"][0].as_py(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    typer.run(main)
