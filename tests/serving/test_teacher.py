"""The teacher in the Serve app: the bundled SmolLM2 through ray.serve.llm (vLLM on CPU),
reached with the official `openai` client, and few-shot diagnosis at /v1/diagnose that
matches the batch diagnose stage. Slow: a teacher replica starts in about a minute and
holds about 7 GiB."""

from __future__ import annotations

import openai
import pytest
from conftest import TOKEN, ServedApp

from radiag.contract import read_record
from radiag.outputs import read_parts
from radiag.serving.records import SERVED_COLUMNS
from radiag.store import RunStore
from radiag.teacher.stages import DIAGNOSE_STAGE

pytestmark = pytest.mark.slow  # setup starts two engines (its time limit: tests/conftest.py)


def _client(app: ServedApp, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key=token, max_retries=0, timeout=120)


def test_the_openai_client_talks_to_the_teacher_unchanged(served_app: ServedApp) -> None:
    client = _client(served_app)
    assert [m.id for m in client.models.list().data] == ["teacher"]
    messages = [{"role": "user", "content": "Name one symptom of Alzheimer's disease."}]
    chat = client.chat.completions.create(
        model="teacher", messages=messages, max_tokens=16, temperature=0
    )
    assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="teacher", messages=messages, max_tokens=16, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == chat.choices[0].message.content  # greedy: the same text, in pieces
    completion = client.completions.create(model="teacher", prompt="The hippocampus", max_tokens=8)
    assert completion.choices[0].text


def test_the_teacher_routes_need_the_token_and_refuse_in_openais_error_shape(
    served_app: ServedApp,
) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        _client(served_app, token="wrong-token-0123456789").models.list()
    assert refused.value.code == "invalid_api_key"


def test_an_unknown_model_is_a_plain_404_and_the_teacher_has_a_card(served_app: ServedApp) -> None:
    client = _client(served_app)
    assert client.models.retrieve("teacher").id == "teacher"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-9")
    assert missing.value.code == "model_not_found"
    assert "Ray" not in str(missing.value.body) and "Exception" not in str(missing.value.body)


def test_served_few_shot_diagnosis_matches_the_batch_stage(served_app: ServedApp) -> None:
    store = RunStore(str(served_app.run))
    batch = {r["patient_id"]: r for r in read_parts(store, "predictions/teacher").to_pylist()}
    test = {r["patient_id"]: r for r in store.read_table("splits/test.parquet").to_pylist()}
    identity = read_record(store, DIAGNOSE_STAGE).fingerprint
    for patient_id, expected in batch.items():
        row = test[patient_id]
        record = {c.name: row[c.name] for c in SERVED_COLUMNS if row[c.name] is not None}
        record.pop("EXAMDATE", None)
        with served_app.client() as client:
            response = client.post(
                "/v1/diagnose",
                json={"model": "teacher", "patient": record, "patient_id": patient_id},
            )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["identity"] == identity
        assert answer["description"] == row["description"]
        assert answer["exemplar_ids"] == list(expected["exemplar_ids"])  # same shots, train only
        assert answer["diagnosis"] == expected["diagnosis"]  # greedy, constrained final line
