"""Benchmark: 1,000,000 synthetic patients through the path a real ADNIMERGE export takes.

Goal (issue: foundation): under 60 s on a 2-core machine, everything included. The
synthetic cohort is written to disk as an ADNIMERGE-shaped CSV (`export_csv`, as the
synthetic ingest writes raw/ADNIMERGE_synthetic.csv), then read back exactly as
`read_adnimerge` reads a user's export (`read_csv_rows`: bytes, delimiter detection, all
values as strings, line numbers; then `canonicalize` with the bundled `adnimerge` mapping:
typing, labels, range checks, quarantine), then every kept row gets its paper-style
description. Baseline visits only, so patients = rows. Each phase is timed on its own;
`user_path_s` is what a real export costs (read + canonicalise + describe).
Writes benchmarks/results/cohort.json.

    python benchmarks/cohort_scale.py [--subjects 1000000]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from provenance import provenance, run_start

from radiag.cohort.describe import DescribeConfig, describe
from radiag.cohort.mapping import bundled_mapping
from radiag.cohort.readers import ADNIMERGE_REQUIRED, read_csv_rows
from radiag.cohort.synthetic import SynthConfig, export_csv, generate_cohort
from radiag.cohort.validate import canonicalize

RESULTS = Path(__file__).parent / "results" / "cohort.json"
GOAL_SUBJECTS, GOAL_SECONDS = 1_000_000, 60


def main(
    subjects: Annotated[int, typer.Option(help="patients to generate")] = GOAL_SUBJECTS,
    out: Annotated[Path, typer.Option(help="results file")] = RESULTS,
) -> None:
    started = run_start()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    frame = generate_cohort(SynthConfig(subjects=subjects, max_visits=1, seed=0))
    timings["generate_s"] = time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="radiag-bench-cohort-") as tmp:
        csv = Path(tmp) / "ADNIMERGE.csv"
        mark = time.perf_counter()
        csv.write_bytes(export_csv(frame))
        timings["write_csv_s"] = time.perf_counter() - mark
        del frame  # from here on only the file is there, as for a user's export
        csv_mb = csv.stat().st_size / 1e6

        mark = time.perf_counter()
        raw = read_csv_rows(csv, required=ADNIMERGE_REQUIRED)
        timings["read_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    result = canonicalize(raw, bundled_mapping("adnimerge"))
    timings["canonicalize_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    described = describe(result.cohort, DescribeConfig())
    timings["describe_s"] = time.perf_counter() - mark
    total = time.perf_counter() - start

    report = {
        "benchmark": "synthetic cohort: generate, write ADNIMERGE-shaped CSV, read it back "
        "as read_adnimerge does (read_csv_rows + canonicalize with the adnimerge mapping), "
        "describe",
        "subjects": subjects,
        "csv_mb": round(csv_mb, 1),
        "rows_read": len(raw),
        "rows_described": described.num_rows,
        "rows_quarantined": int(result.quarantine[["file", "row"]].drop_duplicates().shape[0]),
        "seconds": round(total, 2),
        **{k: round(v, 2) for k, v in timings.items()},
        "user_path_s": round(
            timings["read_s"] + timings["canonicalize_s"] + timings["describe_s"], 2
        ),
        "rows_per_second": round(subjects / total),
        "goal": f"{GOAL_SUBJECTS:,} subjects in under {GOAL_SECONDS} s, everything included",
        "goal_met": total < GOAL_SECONDS if subjects == GOAL_SUBJECTS else None,
        "example": described["description"][0].as_py(),
        **provenance(started),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    typer.run(main)
