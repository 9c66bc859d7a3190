"""benchmarks/README.md is rendered from benchmarks/results/*.json by
benchmarks/render_readme.py, so a benchmark figure lives once, in the results file that
records how it was made. These fail when the README is stale, or when its figures stop
coming from the JSON, or when a benchmark measures something other than it says."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str) -> ModuleType:
    """A benchmarks/ script, loaded from its file: benchmarks/ is not a package. It is
    registered before it runs, as an import would, because a dataclass looks its module up."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


render_readme = _script("render_readme")
provenance = _script("provenance")


def _results_copy(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    shutil.copytree(BENCHMARKS / "results", results)
    return results


def test_the_benchmarks_readme_is_what_the_results_render_to() -> None:
    on_disk = (BENCHMARKS / "README.md").read_text(encoding="utf-8")
    assert render_readme.render() == on_disk, "run python benchmarks/render_readme.py"


def test_a_figure_changed_in_a_results_file_changes_the_readme(tmp_path: Path) -> None:
    results = _results_copy(tmp_path)
    before = render_readme.render(results)
    cohort = json.loads((results / "cohort.json").read_text())
    cohort["seconds"] = 4321.09
    (results / "cohort.json").write_text(json.dumps(cohort))

    after = render_readme.render(results)

    assert "**4,321.09 s**" in after
    assert "4,321.09" not in before
    assert "**33.31 s**" in before and "**33.31 s**" not in after


def test_a_missing_results_file_or_key_reads_not_measured(tmp_path: Path) -> None:
    results = _results_copy(tmp_path)
    (results / "teacher.json").unlink()
    students = json.loads((results / "students.json").read_text())
    del students["distributed_efficiency_equal_cores"]
    (results / "students.json").write_text(json.dumps(students))

    text = render_readme.render(results)

    assert "`results/teacher.json`: missing" in text
    assert "| `ratio_end_to_end` |" in text and "0.959" not in text
    row = next(
        line for line in text.splitlines() if "`distributed_efficiency_equal_cores` |" in line
    )
    assert row.endswith("| not measured |")


def test_a_results_file_records_when_its_figures_were_made(tmp_path: Path) -> None:
    results = _results_copy(tmp_path)
    recorded = provenance.provenance(provenance.RunStart("abc1234", [], load_1min=0.5))
    students = json.loads((results / "students.json").read_text()) | recorded
    (results / "students.json").write_text(json.dumps(students))

    made = datetime.fromisoformat(recorded["date"])

    assert made.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - made) < timedelta(minutes=1)
    assert f"date: {recorded['date']}; 1-minute load: 0.5 at the start" in (
        render_readme.render(results)
    )


def test_a_results_file_names_the_commit_its_run_started_on_and_where_head_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A benchmark runs for up to an hour; a commit made meanwhile is not the code it ran,
    nor is the commit alone where edits were not committed."""
    heads = iter(["a" * 40, "b" * 40])
    monkeypatch.setattr(provenance, "git_commit", lambda: next(heads))
    monkeypatch.setattr(provenance, "uncommitted_changes", lambda: ["radiag/stage.py"])
    recorded = provenance.provenance(provenance.run_start())
    results = _results_copy(tmp_path)
    students = json.loads((results / "students.json").read_text()) | recorded
    (results / "students.json").write_text(json.dumps(students))

    assert recorded["git_commit"] == "a" * 40
    assert recorded["git_commit_at_end"] == "b" * 40
    assert recorded["uncommitted_changes"] == ["radiag/stage.py"]
    assert (
        "commit: `aaaaaaa` (HEAD at the end: `bbbbbbb`), with uncommitted edits to "
        "`radiag/stage.py`;" in render_readme.render(results)
    )


def test_edits_not_committed_when_a_run_starts_are_listed_but_not_its_results(
    tmp_path: Path,
) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    edited = ["radiag/stage.py", "benchmarks/results/students.json", "README.md"]
    for path in edited:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("committed\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    assert provenance.uncommitted_changes(tmp_path) == []

    for path in edited:
        (tmp_path / path).write_text("edited\n")

    assert provenance.uncommitted_changes(tmp_path) == ["radiag/stage.py"]
    assert provenance.uncommitted_changes(tmp_path / "no-repository") is None


def test_the_attention_kernels_the_roofline_ceiling_times_compute_the_same_attention() -> None:
    """`student_step.py`'s ceiling takes the fastest of these kernels: each must do the work
    the training step's attention does, or the fastest could be fast by doing less."""
    import torch

    _script("students")  # student_step imports from it
    student_step = _script("student_step")
    lengths, heads, head_dim = [9, 5, 7], 3, 8
    kernels = student_step.attention_kernels(lengths, head_dim, "float32")
    q, k, v = (torch.randn(len(lengths), heads, max(lengths), head_dim) for _ in range(3))
    reference = kernels["sdpa_mask"][1](q, k, v)
    assert set(kernels) == {"sdpa_mask", "sdpa_causal", "sdpa_float32", "explicit"}
    for name, (_, attend) in kernels.items():
        out = attend(q, k, v)
        for row, length in enumerate(lengths):  # the real tokens; padding is never trained
            torch.testing.assert_close(
                out[row, :, :length], reference[row, :, :length], msg=lambda m, n=name: f"{n}: {m}"
            )
