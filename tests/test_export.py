"""`radiag export`: the augmented data set as other tools read it, and what a data-use
agreement keeps out of it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from radiag.cli import app
from radiag.cohort.describe import DescribeConfig
from radiag.cohort.schema import Label
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
from radiag.store import RunStore
from radiag.teacher.prompts import ANSWERS
from radiag.teacher.stages import read_output

FIXTURES = Path(__file__).parent / "fixtures"
runner = CliRunner()


@pytest.fixture(scope="module")
def exported(split_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's synthetic run with rationales, exported by the command line."""
    out = tmp_path_factory.mktemp("export") / "data-set"
    result = runner.invoke(app, ["export", "--run", str(split_run), "--to", str(out)])
    assert result.exit_code == 0, result.output
    assert "exported:" in result.output and "left out" not in result.output
    return out


def test_the_splits_load_with_datasets_both_ways_and_subjects_never_cross(
    exported: Path, split_run: Path
) -> None:
    from datasets import load_dataset, load_from_disk

    from_disk = load_from_disk(str(exported / "dataset"))
    from_card = load_dataset(str(exported))  # the card's configs name data/<split>.parquet
    assert set(from_disk) == set(from_card) == {"train", "validation", "test"}
    store = RunStore(str(split_run))
    for name, file in (("train", "train"), ("validation", "val"), ("test", "test")):
        split = store.read_table(f"splits/{file}.parquet").to_pandas()
        labelled = set(split.loc[split["label"].notna(), "patient_id"])
        assert set(from_disk[name]["patient_id"]) == set(from_card[name]["patient_id"]) == labelled
    subjects = {name: set(from_disk[name]["RID"]) for name in from_disk}
    assert (
        not subjects["train"] & subjects["test"] and not subjects["train"] & subjects["validation"]
    )


def test_training_rows_carry_their_rationale_and_its_provenance(
    exported: Path, split_run: Path
) -> None:
    train = pq.read_table(exported / "data" / "train.parquet").to_pandas()
    test = pq.read_table(exported / "data" / "test.parquet").to_pandas()
    rationales = read_output(RunStore(str(split_run)), "rationalize").to_pandas()
    rationales = rationales.set_index("patient_id")
    explained = train[train["rationale"].notna()]
    assert len(explained) == len(rationales)
    for row in explained.itertuples():
        assert row.rationale == rationales.loc[row.patient_id, "rationale"]
        assert row.qc_flagged == rationales.loc[row.patient_id, "qc_flagged"]
    assert test["rationale"].isna().all()  # the teacher never explains a test patient


def test_the_chat_file_is_what_a_student_trains_on_without_the_label_in_the_prompt(
    exported: Path,
) -> None:
    """QC-flagged rationales stay out; the user turn is the diagnosis prompt (no label);
    the assistant turn is the rationale and the final line."""
    train = pq.read_table(exported / "data" / "train.parquet").to_pandas()
    passed = train[train["rationale"].notna() & ~train["qc_flagged"].astype(bool)]
    lines = [
        json.loads(line) for line in (exported / "chat" / "train.jsonl").read_text().splitlines()
    ]
    assert {line["patient_id"] for line in lines} == set(passed["patient_id"])
    by_id = passed.set_index("patient_id")
    for line in lines:
        _, user, assistant = line["messages"]
        assert [m["role"] for m in line["messages"]] == ["system", "user", "assistant"]
        assert "correct diagnosis" not in user["content"]
        assert user["content"].startswith(by_id.loc[line["patient_id"], "description"])
        assert assistant["content"].startswith(by_id.loc[line["patient_id"], "rationale"])
        label = Label(by_id.loc[line["patient_id"], "label"])
        assert assistant["content"].endswith(f"Final Diagnosis: {ANSWERS[label]}")


def test_the_card_has_hugging_face_front_matter_and_says_what_the_data_is(exported: Path) -> None:
    card = (exported / "README.md").read_text()
    front, body = card.split("---\n")[1:3]
    meta = json.loads(front)  # JSON is YAML: the Hub reads it
    assert meta["configs"][0]["data_files"][0] == {"split": "train", "path": "data/train.parquet"}
    for needed in ("Synthetic cohort", "Rationale length", "269.4", "QC flag rate",
                   "stage identities", "Citation", "not a medical device"):  # fmt: skip
        assert needed.lower() in body.lower(), needed
    criteria = re.search(
        r"Automatic criteria .*?:\s+consistency (\S+), specificity (\S+) \(", body, re.S
    )
    assert criteria is not None, body
    assert all(1 <= float(score) <= 5 for score in criteria.groups())


def test_the_card_renders_in_chromium_as_the_hub_shows_it(exported: Path) -> None:
    """The card's Markdown below its front matter, rendered as the Hub renders cards
    (CommonMark with GitHub tables) and opened in headless Chromium: the label counts are a
    table with a row per split, and the figures read as text beside it."""
    from markdown_it import MarkdownIt
    from page_driver import browser_page

    body = (exported / "README.md").read_text().split("---\n", 2)[2]
    html = MarkdownIt("commonmark").enable("table").render(body)
    with browser_page(token="") as page:
        page.set_content(f"<html><body>{html}</body></html>")
        headers = page.locator("table th").all_inner_texts()
        splits = page.locator("table tbody tr td:first-child").all_inner_texts()
        headings = page.locator("h2").all_inner_texts()
        text = page.inner_text("body")
    assert headers == ["split", "rows", *(label.value for label in Label)]
    assert splits == ["train", "validation", "test"]
    assert {"Source and licence", "What it holds", "Citation"} <= set(headings)
    assert "Rationale length" in text and "269.4" in text and "|---|" not in text


def test_a_real_cohort_exports_no_record_columns_and_descriptions_only_when_asked(
    tmp_path: Path, write_rationales
) -> None:
    """An ADNIMERGE-shaped export (data-use agreement): ids, labels, rationales; the
    command names what it left out and why."""
    run = tmp_path / "run"
    store = RunStore(str(run))
    shutil.copy(FIXTURES / "ADNIMERGE_quirks.csv", tmp_path / "ADNIMERGE.csv")
    ingest(IngestConfig(source="adnimerge", path=str(tmp_path / "ADNIMERGE.csv")), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    write_rationales(store)

    plain = runner.invoke(app, ["export", "--run", str(run), "--to", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    assert "left out: the source record's columns" in plain.output
    assert "data-use agreement" in plain.output and "--include-descriptions" in plain.output
    columns = pq.read_schema(tmp_path / "plain" / "data" / "train.parquet").names
    assert {"patient_id", "label", "rationale"} <= set(columns)
    assert not {"MMSE", "AGE", "PTID", "description"} & set(columns)
    assert (tmp_path / "plain" / "chat" / "train.jsonl").read_text() == ""
    assert "data-use agreement" in (tmp_path / "plain" / "README.md").read_text()

    asked = ["export", "--run", str(run), "--to", str(tmp_path / "asked"), "--include-descriptions"]
    assert runner.invoke(app, asked).exit_code == 0
    columns = pq.read_schema(tmp_path / "asked" / "data" / "train.parquet").names
    assert "description" in columns and "MMSE" not in columns


def test_an_export_of_a_run_without_a_cohort_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["export", "--run", str(tmp_path / "empty"), "--to", str(tmp_path / "x")]
    )
    assert result.exit_code == 2
    assert "stage cohort has not finished" in result.output


def test_a_student_exports_as_a_model_transformers_loads_with_its_card(
    trained_run: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for kind in ("text", "vlm"):
        out = tmp_path / kind
        result = runner.invoke(app, ["export", "--run", str(trained_run), "--to", str(out),
                                     "--student", kind])  # fmt: skip
        assert result.exit_code == 0, result.output
        AutoModelForCausalLM.from_pretrained(out / "lm")
        AutoTokenizer.from_pretrained(out / "lm")
        assert (out / "mri_prefix.pt").is_file() == (kind == "vlm")
        card = (out / "README.md").read_text()
        meta = json.loads(card.split("---\n")[1])
        assert meta["library_name"] == "transformers" and meta["base_model"]
        for needed in ("Base model", "loss", "Stage identity", "Not a medical device",
                       "Not evaluated yet", "`decision: balanced`"):  # fmt: skip
            assert needed in card, (kind, needed)


def test_a_run_without_the_student_is_one_line_and_exit_2(split_run: Path, tmp_path: Path) -> None:
    args = ["export", "--run", str(split_run), "--to", str(tmp_path / "x"), "--student", "text"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "stage distill-text has not finished" in result.output


@pytest.mark.parametrize(
    ("offline", "token", "message"),
    [
        (False, None, "--push-to-hub needs a Hugging Face write token: set HF_TOKEN"),
        (True, "hf_test_token", "--push-to-hub cannot reach the Hub while HF_HUB_OFFLINE is set"),
    ],
    ids=["no-token", "offline"],
)
def test_a_push_to_hub_that_cannot_work_is_refused_before_anything_is_exported(
    split_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    offline: bool,
    token: str | None,
    message: str,
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)  # read once, at import
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no `hf auth login` token either
    out = tmp_path / "data-set"
    push = ["export", "--run", str(split_run), "--to", str(out), "--push-to-hub", "lab/adni"]
    result = runner.invoke(app, push)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not out.exists()


@pytest.fixture
def hub_requests() -> Iterator[tuple[str, list[dict]]]:
    """An HTTP endpoint on 127.0.0.1 that records every request and refuses it (403), as a
    Hub would refuse a token without write access: the Hub itself cannot be reached here."""
    seen: list[dict] = []

    class Refuse(BaseHTTPRequestHandler):
        def _refuse(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append({"method": self.command, "path": self.path, "body": body,
                         "authorization": self.headers.get("Authorization")})  # fmt: skip
            payload = json.dumps({"error": "this token cannot write to lab"}).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = _refuse

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_a_push_to_hub_asks_the_hub_for_a_private_repo_and_a_refusal_keeps_the_export(
    split_run: Path, tmp_path: Path, hub_requests: tuple[str, list[dict]]
) -> None:
    """The upload path is huggingface_hub's, at the endpoint HF_ENDPOINT names (a subprocess:
    huggingface_hub reads it when imported)."""
    endpoint, seen = hub_requests
    out = tmp_path / "data-set"
    env = os.environ | {"HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_test_token",
                        "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0",
                        "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "radiag.cli", "export", "--run", str(split_run), "--to", str(out),
         "--push-to-hub", "lab/adni-rationales"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    said = " ".join(result.stderr.split())
    assert "the export was written, but its push to the Hub repository lab/adni-rationales" in said
    assert (out / "README.md").is_file() and (out / "data" / "train.parquet").is_file()
    creates = [r for r in seen if (r["method"], r["path"]) == ("POST", "/api/repos/create")]
    assert len(creates) == 1, (seen, result.stderr[-3000:])
    (create,) = creates
    assert create["authorization"] == "Bearer hf_test_token"
    asked = json.loads(create["body"])
    assert (asked["organization"], asked["name"], asked["type"]) == (
        "lab",
        "adni-rationales",
        "dataset",
    )
    assert asked.get("private") is True or asked.get("visibility") == "private", asked
