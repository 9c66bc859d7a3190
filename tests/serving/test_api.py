"""The HTTP API of the Serve app, through a real client on 127.0.0.1: auth, validation,
every model of the run, the same answers as the batch stages, metrics and logs."""

from __future__ import annotations

import base64
import gzip
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import TOKEN, ServedApp

from radiag.baseline import BASELINE_STAGE
from radiag.contract import read_record
from radiag.outputs import PROBABILITY_COLUMNS, read_parts
from radiag.serving.records import SERVED_COLUMNS
from radiag.store import RunStore
from radiag.students.config import distill_stage
from radiag.teacher.stages import DIAGNOSE_STAGE

pytestmark = pytest.mark.slow  # the session's trained run (two students) and served app
RECORD = {"AGE": 74, "PTGENDER": "Female", "PTEDUCAT": 17, "MMSE": 24, "APOE4": 1}
PROTECTED = [
    ("GET", "/"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v1/diagnose/models"),
    ("GET", "/v1/examples"), ("GET", "/v1/models"), ("POST", "/v1/diagnose"),
    ("POST", "/v1/chat/completions"),
]  # fmt: skip


def diagnose(app: ServedApp, model: str, patient: dict, **fields: object) -> dict:
    with app.client() as client:
        response = client.post("/v1/diagnose", json={"model": model, "patient": patient, **fields})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.reliability
def test_healthz_is_the_only_route_without_the_token(served_app: ServedApp) -> None:
    with served_app.client(token=None) as anonymous, served_app.client(token="x" * 24) as wrong:
        assert anonymous.get("/healthz").status_code == 200
        for method, path in PROTECTED:
            for client in (anonymous, wrong):
                response = client.request(method, path, json={})
                assert response.status_code == 401, (method, path)
                assert response.headers["www-authenticate"] == 'Basic realm="radiag"'


BYPASSES = {  # an attempt to reach a protected route without the token in a header
    "token in the query string": ("GET", f"/v1/models?token={TOKEN}&access_token={TOKEN}"),
    "token as Basic user name": ("GET", "/v1/models"),
    "Basic with a wrong password": ("GET", "/v1/models"),
    "Bearer with an empty token": ("GET", "/v1/models"),
    "a doubled slash": ("GET", "//v1/models"),
    "a dot segment through healthz": ("GET", "/healthz/../v1/models"),
    "an encoded dot segment": ("GET", "/healthz/%2e%2e/v1/models"),
    "an encoded slash": ("GET", "/v1%2Fmodels"),
    "upper case": ("GET", "/V1/MODELS"),
    "a trailing slash": ("POST", "/v1/diagnose/"),
    "healthz with a protected path after it": ("GET", "/healthz;/v1/models"),
}  # fmt: skip
BYPASS_HEADERS = {
    "token as Basic user name": {"Authorization": "Basic " + base64.b64encode(f"{TOKEN}:x".encode()).decode()},
    "Basic with a wrong password": {"Authorization": "Basic " + base64.b64encode(b"clinician:guess").decode()},
    "Bearer with an empty token": {"Authorization": "Bearer"},
}  # fmt: skip


@pytest.mark.reliability
@pytest.mark.parametrize(("method", "path"), BYPASSES.values(), ids=BYPASSES)
def test_no_way_around_the_token_reaches_a_protected_route(
    served_app: ServedApp, method: str, path: str, request: pytest.FixtureRequest
) -> None:
    case = request.node.callspec.id
    with served_app.client(token=None) as anonymous:
        healthz = anonymous.get("/healthz")
        raw = httpx.Request(method, served_app.url + path, headers=BYPASS_HEADERS.get(case, {}))
        raw.url = raw.url.copy_with(raw_path=path.encode())  # as written: no client normalising
        response = anonymous.send(raw)
    if response.status_code == 200:  # only healthz answers without the token
        assert response.content == healthz.content, (case, response.text[:200])
    else:
        assert response.status_code in {401, 403, 404}, (case, response.status_code)
        assert '"data"' not in response.text  # no model list, no answer


def test_the_openapi_schema_documents_the_diagnose_bodies_and_the_token(
    served_app: ServedApp,
) -> None:
    with served_app.client() as client:
        schema = client.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "basic"}
    diagnose = schema["paths"]["/v1/diagnose"]["post"]
    assert set(diagnose["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert diagnose["security"] == [{"bearer": []}, {"basic": []}]
    assert schema["paths"]["/healthz"]["get"]["security"] == []
    record = schema["components"]["schemas"]["PatientRecord"]["properties"]
    assert {"type": "string", "format": "date"} in record["EXAMDATE"]["anyOf"]


def test_a_browser_sends_the_token_as_basic_auth_password(served_app: ServedApp) -> None:
    basic = base64.b64encode(f"clinician:{TOKEN}".encode()).decode()
    with served_app.client(token=None) as client:
        page = client.get("/", headers={"Authorization": f"Basic {basic}"})
    assert page.status_code == 200
    assert 'id="diagnose-form"' in page.text


def test_every_model_of_the_run_is_listed_with_its_stage_identity(served_app: ServedApp) -> None:
    store = RunStore(str(served_app.run))
    with served_app.client() as client:
        listing = client.get("/v1/diagnose/models").json()
    cards = {card["name"]: card for card in listing["models"]}
    baselines = {f"baseline-logistic-{f}" for f in ("tabular", "description", "tabular_cognition")}
    assert set(cards) == {"teacher", "student-text", "student-vlm", *baselines}
    assert listing["mri_locations"] is True  # the fixture allows the run's mri/ folder
    assert cards["teacher"]["identity"] == read_record(store, DIAGNOSE_STAGE).fingerprint
    for kind in ("text", "vlm"):
        expected = read_record(store, distill_stage(kind)).fingerprint
        assert cards[f"student-{kind}"]["identity"] == expected
    assert cards["student-vlm"]["uses_mri"] is True
    assert {cards[b]["identity"] for b in baselines} == {
        read_record(store, BASELINE_STAGE).fingerprint
    }
    # What each model reads, for the page: the description's fields, or a feature set's.
    assert {"MMSE", "APOE4", "Hippocampus", "AGE"} <= set(cards["student-text"]["fields"])
    assert "MMSE" not in cards["baseline-logistic-tabular"]["fields"]
    assert "CDRSB" in cards["baseline-logistic-tabular_cognition"]["fields"]


def test_an_exemplar_is_a_labelled_training_patients_description_and_nothing_else(
    served_app: ServedApp,
) -> None:
    store = RunStore(str(served_app.run))
    train = store.read_table("splits/train.parquet").to_pylist()
    row = next(r for r in train if r["label"])
    test_patient = store.read_table("splits/test.parquet")["patient_id"][0].as_py()
    with served_app.client() as client:
        shown = client.get(f"/v1/exemplars/{row['patient_id']}")
        refused = [client.get(f"/v1/exemplars/{p}") for p in (test_patient, "nobody")]
    assert shown.json() == {key: row[key] for key in ("patient_id", "label", "description")}
    assert [r.status_code for r in refused] == [404, 404]


def test_served_answers_are_the_batch_stages_answers(served_app: ServedApp) -> None:
    """Same description as the splits stage; greedy, the same diagnosis and probabilities
    as the batch student diagnosis and the baseline predictions for the same patients."""
    store = RunStore(str(served_app.run))
    batch = {r["patient_id"]: r for r in read_parts(store, "predictions/student-text").to_pylist()}
    baseline = {
        r["patient_id"]: r
        for r in read_parts(store, "predictions/baseline-logistic-description").to_pylist()
    }
    test = store.read_table("splits/test.parquet")
    test = test.filter(pc.is_in(test["patient_id"], value_set=pa.array(list(batch))))
    assert test.num_rows == 3
    for row in test.to_pylist():
        record = {c.name: row[c.name] for c in SERVED_COLUMNS if row[c.name] is not None}
        record["EXAMDATE"] = record["EXAMDATE"].isoformat()  # JSON: an ISO date
        for model, expected in (
            ("student-text", batch),
            ("baseline-logistic-description", baseline),
        ):
            answer = diagnose(served_app, model, record, patient_id=row["patient_id"])
            assert answer["description"] == row["description"]
            want = expected[row["patient_id"]]
            assert answer["diagnosis"] == want["diagnosis"]
            for label, column in PROBABILITY_COLUMNS.items():
                assert answer["probabilities"][label] == pytest.approx(want[column], abs=1e-4)
            # The student says how it chose (its batch rows record it too); a baseline does not.
            assert answer["decision"] == {"student-text": "balanced"}.get(model)


@pytest.mark.reliability
def test_the_served_mri_student_answers_as_its_batch_stage_for_the_same_record_and_t1(
    served_app: ServedApp,
) -> None:
    store = RunStore(str(served_app.run))
    batch = {r["patient_id"]: r for r in read_parts(store, "predictions/student-vlm").to_pylist()}
    test = store.read_table("splits/test.parquet").to_pylist()
    imaged = [r for r in test if r["patient_id"] in batch and r["mri_path"]]
    assert len(imaged) >= 2
    for row in imaged:
        record = {c.name: row[c.name] for c in SERVED_COLUMNS if row[c.name] is not None}
        record["EXAMDATE"] = record["EXAMDATE"].isoformat()
        request = {"model": "student-vlm", "patient": record, "patient_id": row["patient_id"]}
        with served_app.client() as client:
            response = client.post(
                "/v1/diagnose",
                data={"request": json.dumps(request)},
                files={"mri": ("t1.nii.gz", Path(row["mri_path"]).read_bytes())},
            )
        assert response.status_code == 200, response.text
        answer, want = response.json(), batch[row["patient_id"]]
        assert answer["diagnosis"] == want["diagnosis"], row["patient_id"]
        for label, column in PROBABILITY_COLUMNS.items():
            assert answer["probabilities"][label] == pytest.approx(want[column], abs=1e-4)


def test_concurrent_requests_are_answered_in_batches(served_app: ServedApp) -> None:
    """`@serve.batch`: requests that arrive together share one generate call, and a
    batched answer is the answer the patient gets alone (greedy)."""
    alone = diagnose(served_app, "student-text", RECORD)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: diagnose(served_app, "student-text", RECORD), range(8)))
    assert alone["batch_size"] == 1 and max(a["batch_size"] for a in answers) > 1
    assert {a["diagnosis"] for a in answers} == {alone["diagnosis"]}


@pytest.mark.reliability
def test_a_record_too_thin_to_diagnose_is_answered_with_a_warning(served_app: ServedApp) -> None:
    thin = diagnose(served_app, "baseline-logistic-tabular", {"AGE": 70, "PTGENDER": "Female"})
    assert thin["warnings"] and "0 clinical finding(s)" in thin["warnings"][0]
    assert diagnose(served_app, "baseline-logistic-tabular", RECORD)["warnings"] == []


@pytest.mark.reliability
def test_a_label_in_the_record_is_refused(served_app: ServedApp) -> None:
    for field in ("label", "DX", "DX_bl"):
        with served_app.client() as client:
            response = client.post(
                "/v1/diagnose", json={"model": "student-text", "patient": RECORD | {field: "AD"}}
            )
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["patient", field]


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ({"model": "student-text", "patient": RECORD | {"MMSE": 31}}, ["patient", "MMSE"]),
        ({"model": "student-text", "patient": RECORD | {"AGE": "old"}}, ["patient", "AGE"]),
        ({"model": "student-text", "patient": RECORD | {"PTGENDER": "M"}}, ["patient", "PTGENDER"]),
        ({"model": "student-text", "patient": RECORD | {"shoe_size": 9}}, ["patient", "shoe_size"]),
        (
            {"model": "student-text", "patient": RECORD | {"EXAMDATE": "yesterday"}},
            ["patient", "EXAMDATE"],
        ),
        (
            {"model": "student-text", "patient": RECORD | {"EXAMDATE": "2024-02-30"}},
            ["patient", "EXAMDATE"],
        ),
        ({"model": "student-text", "patient": RECORD | {"EXAMDATE": ""}}, ["patient", "EXAMDATE"]),
        ({"patient": RECORD}, ["model"]),
        ({"model": "student-text", "patient": RECORD, "extra": 1}, ["extra"]),
    ],
)
@pytest.mark.reliability
def test_bad_fields_are_422_naming_the_field(
    served_app: ServedApp, body: dict, location: list[str]
) -> None:
    with served_app.client() as client:
        response = client.post("/v1/diagnose", json=body)
    assert response.status_code == 422
    assert location in [error["loc"] for error in response.json()["detail"]]


@pytest.mark.reliability
def test_malformed_requests_are_never_a_500(served_app: ServedApp) -> None:
    with served_app.client() as client:
        statuses = {
            "not json": client.post("/v1/diagnose", content=b"{oops").status_code,
            "a list": client.post("/v1/diagnose", json=[1, 2]).status_code,
            "no body": client.post("/v1/diagnose").status_code,
            "multipart without request": client.post(
                "/v1/diagnose", files={"mri": ("a.nii.gz", b"x")}
            ).status_code,
            "unknown model": client.post(
                "/v1/diagnose", json={"model": "gpt-9", "patient": RECORD}
            ).status_code,
        }
    assert statuses == {"not json": 422, "a list": 422, "no body": 422,
                        "multipart without request": 422, "unknown model": 404}  # fmt: skip


def _imaged(app: ServedApp) -> Path:
    return sorted((app.run / "mri").glob("*-bl.nii.gz"))[0]


def _upload(app: ServedApp, data: bytes, model: str = "student-vlm") -> object:
    request = json.dumps({"model": model, "patient": RECORD})
    with app.client() as client:
        return client.post(
            "/v1/diagnose", data={"request": request}, files={"mri": ("t1.nii.gz", data)}
        )


def test_the_mri_student_reads_an_uploaded_t1_or_one_under_an_allowed_prefix(
    served_app: ServedApp,
) -> None:
    uploaded = _upload(served_app, _imaged(served_app).read_bytes())
    assert uploaded.status_code == 200 and uploaded.json()["mri_used"] is True
    by_uri = diagnose(served_app, "student-vlm", RECORD, mri_uri=str(_imaged(served_app)))
    assert by_uri["mri_used"] is True
    assert by_uri["probabilities"] == pytest.approx(uploaded.json()["probabilities"], abs=1e-4)


@pytest.mark.reliability
def test_mri_problems_are_403_413_or_422(served_app: ServedApp, tmp_path: Path) -> None:
    outside = tmp_path / "t1.nii.gz"
    outside.write_bytes(_imaged(served_app).read_bytes())
    escape = f"{served_app.run}/mri/../splits/test.parquet"
    with served_app.client() as client:
        for uri in (str(outside), escape, "s3://elsewhere/t1.nii.gz"):
            body = {"model": "student-vlm", "patient": RECORD, "mri_uri": uri}
            assert client.post("/v1/diagnose", json=body).status_code == 403, uri
    corrupted = _upload(served_app, b"\x1f\x8b not really gzip")
    assert corrupted.status_code == 422 and corrupted.json()["detail"][0]["loc"] == ["mri"]
    too_large = _upload(served_app, b"\0" * (5 * 2**20))  # the fixture allows 4 MB
    bomb = _upload(served_app, gzip.compress(b"\0" * (300 * 2**20), compresslevel=9))
    assert bomb.status_code == 413 and "expands to more than 256" in bomb.json()["detail"]
    with served_app.client() as client:  # chunked: no content-length to check up front
        chunks = (b" " * 2**20 for _ in range(5))
        chunked = client.post("/v1/diagnose", content=chunks,
                              headers={"content-type": "application/json"})  # fmt: skip
    assert chunked.status_code == 413
    assert too_large.status_code == 413
    with served_app.client() as client:
        no_t1 = client.post("/v1/diagnose", json={"model": "student-vlm", "patient": RECORD})
    assert no_t1.status_code == 422


def test_readyz_and_metrics_by_route_and_model(served_app: ServedApp) -> None:
    diagnose(served_app, "student-text", RECORD)
    with served_app.client() as client:
        ready = client.get("/readyz")
        metrics = client.get("/metrics").text
    assert ready.status_code == 200 and ready.json() == {"ready": True, "waiting": []}
    sample = 'radiag_requests_total{model="student-text",route="/v1/diagnose",status="200"}'
    assert sample in metrics
    assert 'radiag_request_seconds_count{model="student-text",route="/v1/diagnose"}' in metrics


@pytest.mark.reliability
def test_metrics_label_routes_by_template_so_no_client_can_add_series(
    served_app: ServedApp,
) -> None:
    probe = f"/probe-{uuid.uuid4().hex}"
    with served_app.client(token=None) as anonymous:
        assert anonymous.get(probe).status_code == 401
        assert anonymous.get(f"/v1/models/{probe}").status_code == 401
    with served_app.client() as client:
        metrics = client.get("/metrics").text
    assert probe not in metrics
    assert 'route="unmatched",status="401"' in metrics
    assert 'route="/v1/models/{model:path}",status="401"' in metrics


def test_examples_are_synthetic_records_without_labels(served_app: ServedApp) -> None:
    with served_app.client() as client:
        examples = client.get("/v1/examples").json()["examples"]
    assert examples
    for example in examples:
        assert not {"label", "DX", "DX_bl", "PTID", "RID", "VISCODE", "EXAMDATE"} & set(
            example["patient"]
        )  # no answer, and no identifiers, even synthetic ones
        diagnose(served_app, "baseline-logistic-tabular", example["patient"])


@pytest.mark.reliability
def test_logs_hold_neither_the_token_nor_patient_data(served_app: ServedApp) -> None:
    import ray

    marker = "This patient is a 97-year-old"
    diagnose(served_app, "student-text", RECORD | {"AGE": 97}, patient_id="log-check")
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    text = "\n".join(p.read_text(errors="ignore") for p in logs.rglob("*") if p.is_file()
                     and p.suffix in {".log", ".out", ".err"})  # fmt: skip
    assert "'log-check'" in text  # the request was logged, by id (quoted, escaped)
    assert TOKEN not in text
    assert marker not in text
