"""The Serve application: one authenticated ingress in front of every model of a run.

    ingress (FastAPI, bearer auth, validation, metrics, web page)
      ├── /v1/chat/completions, /v1/completions, /v1/models  -> teacher LLM (ray.serve.llm)
      └── /v1/diagnose  -> TeacherServer | StudentServer(text, vlm) | BaselineServer

`build_app(args)` is the application builder `serve run` / `serve deploy` call with the
`args` of `serve/config.yaml`, which validate as a `ServeConfig`; `radiag serve` calls it
too. Ray Serve has no authentication of its own: the ingress checks a bearer token (or
HTTP Basic with the token as password, which is how a browser sends it) on every route
but /healthz, in constant time. Request bodies and tokens are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import ray
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from starlette.routing import Match

from radiag.baseline import BASELINE_MODELS, FEATURE_SETS, MODELS_DIR
from radiag.cohort.describe import DescribeConfig, described_columns
from radiag.cohort.stages import COHORT_STAGE, SPLITS_STAGE, run_norm
from radiag.contract import read_record
from radiag.serving.admission import AdmissionLimit
from radiag.serving.config import ServeConfig, TeacherServeConfig, sized_to_cluster
from radiag.serving.records import (
    SERVED_COLUMNS,
    DiagnoseRequest,
    DiagnoseResponse,
    answer_warnings,
    describe_record,
    record_fields,
)
from radiag.serving.servers import (
    BaselineServer,
    StudentRequest,
    StudentServer,
    student_diagnose_config,
)
from radiag.store import RunStore, filesystem_for
from radiag.students.config import stage_dir

log = logging.getLogger("ray.serve")  # what Serve writes to each replica's log file

PAGE = Path(__file__).parent / "web" / "index.html"
SIGN_IN_PAGE = (
    "<!doctype html><title>radiag: sign in</title><p>Not signed in: reload the page and give "
    "any user name with the service's access token as the password.</p>"
)
OPEN_ROUTES = frozenset({"/healthz"})
INGRESS_MAX_ONGOING = 256
IDENTIFIERS = frozenset({"RID", "PTID", "VISCODE", "EXAMDATE"})
"""Left out of the page's example records: a synthetic patient needs no identifiers."""
IDENTITY_WAIT_S = 0.25
"""How long /v1/diagnose/models waits for the deployments (all at once) to name their
identities themselves."""
MODEL_FIELDS = frozenset(DiagnoseResponse.model_fields) - {
    "model", "patient_id", "description", "argued_class", "warnings", "latency_s",
}  # fmt: skip
"""What a model deployment's answer may set; the ingress sets the rest itself."""
STUDENT_KINDS = ("text", "vlm")


class ConfigurationError(RuntimeError):
    """The app cannot start as configured (no token, no run); the message is user-facing."""


def read_token(cfg: ServeConfig) -> str:
    """The bearer token: from `token_file` if set, else from the `token_env` variable."""
    if cfg.token_file:
        token = Path(cfg.token_file).read_text().splitlines()[0].strip()
    else:
        token = os.environ.get(cfg.token_env, "").strip()
    if len(token) < 16:
        raise ConfigurationError(
            f"no serving token: set {cfg.token_env} (or token_file) to a secret of at least "
            "16 characters, e.g. `export RADIAG_SERVE_TOKEN=$(openssl rand -hex 24)`"
        )
    return token


def presented_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` or `Basic base64(user:token)` header."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def describe_config(store: RunStore) -> DescribeConfig:
    """How the run described its patients (the splits stage's recorded config)."""
    record = read_record(store, SPLITS_STAGE)
    if record is None:
        raise ConfigurationError(f"{store.uri_of(SPLITS_STAGE.record)}: the run has no splits")
    return DescribeConfig.model_validate(record.identity.config["describe"])


def model_fields(name: str, kind: str, describe_cfg: DescribeConfig) -> list[str]:
    """The record fields a model reads: a baseline its feature set's, the teacher and the
    students the description's (the page greys out the others)."""
    if kind == "baseline":
        _, feature_set = BASELINE_MODELS[name]
        return record_fields(set(FEATURE_SETS[feature_set]))
    return record_fields(described_columns(describe_cfg))


def served_models(cfg: ServeConfig, store: RunStore) -> dict[str, dict[str, Any]]:
    """The models of the run that /v1/diagnose answers with: name -> card. All of them, or
    those `cfg.models` names (each must be in the run)."""
    found: dict[str, dict[str, Any]] = {}
    if cfg.teacher is not None:
        found["teacher"] = {"kind": "teacher", "uses_mri": False}
    for kind in STUDENT_KINDS:
        if store.exists(f"{stage_dir(kind)}/final/student.json"):
            found[f"student-{kind}"] = {"kind": "student", "uses_mri": kind == "vlm"}
    for path in store.list_files(MODELS_DIR, ".joblib"):
        found[path.rsplit("/", 1)[1].removesuffix(".joblib")] = {
            "kind": "baseline",
            "uses_mri": False,
        }
    if cfg.models is None:
        return found
    if unknown := sorted(set(cfg.models) - set(found)):
        raise ConfigurationError(
            f"models {', '.join(unknown)}: not served from {store.uri} (it has "
            f"{', '.join(found)}; the teacher needs `teacher` set)"
        )
    return {name: card for name, card in found.items() if name in cfg.models}


def _error(status: int, detail: Any) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _validation_error(err: ValidationError, prefix: tuple[str, ...] = ()) -> JSONResponse:
    """422 naming each bad field by its path (`patient.MMSE`), without echoing the input."""
    detail = [  # an error of the whole body (not JSON, empty) is the body's: loc ["body"]
        {"loc": [*prefix, *map(str, e["loc"])] or ["body"], "msg": e["msg"], "type": e["type"]}
        for e in err.errors()
    ]
    return _error(422, detail)


REGISTRY = CollectorRegistry()  # this replica's radiag metrics, at /metrics
REQUESTS = Counter(
    "radiag_requests", "Requests by route, model and status", ["route", "model", "status"],
    registry=REGISTRY,
)  # fmt: skip
LATENCY = Histogram(
    "radiag_request_seconds", "Request latency by route and model", ["route", "model"],
    registry=REGISTRY, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)  # fmt: skip


def _busy(model: str, retry_after_s: int) -> JSONResponse:
    response = _error(503, f"{model} is at capacity; retry shortly")
    response.headers["Retry-After"] = str(retry_after_s)
    return response


def openai_error(status: int, message: str, code: str) -> JSONResponse:
    """An error in OpenAI's shape (what its clients parse), with `detail` as on every route."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return JSONResponse({"error": error, "detail": message}, status_code=status)


def route_label(request: Request) -> str:
    """The template of the route a request goes to (`/v1/models/{model:path}`), never its
    raw path: a label per path would let anyone create metric series."""
    for route in request.app.router.routes:
        if route.matches(request.scope)[0] != Match.NONE:
            return route.path
    return "unmatched"


async def authenticate_and_measure(request: Request, call_next: Any) -> Response:
    """401 without the app's token (but on /healthz); count and time every request."""
    start = time.perf_counter()
    route = route_label(request)
    if request.url.path not in OPEN_ROUTES:
        given, token = presented_token(request), request.app.state.token
        if given is None or not hmac.compare_digest(given.encode(), token.encode()):
            response: Response = (
                HTMLResponse(SIGN_IN_PAGE, status_code=401)
                if request.url.path == "/"  # a browser after a wrong password: no raw JSON
                else openai_error(401, "missing or wrong bearer token", "invalid_api_key")
            )
            response.headers["WWW-Authenticate"] = 'Basic realm="radiag"'
            REQUESTS.labels(route, "", "401").inc()
            return response
    response = await call_next(request)
    model = getattr(request.state, "model", "")
    REQUESTS.labels(route, model, str(response.status_code)).inc()
    LATENCY.labels(route, model).observe(time.perf_counter() - start)
    return response


def build_fastapi(token: str) -> FastAPI:
    """The ingress's FastAPI app: ray.serve.llm's own middleware for the OpenAI routes, then
    ours (module-level, so the app pickles into the replicas by reference)."""
    from ray.llm._internal.serve.core.ingress.ingress import init

    app = init()
    app.state.token = token
    app.middleware("http")(authenticate_and_measure)
    app.openapi = lambda: documented_openapi(app)  # type: ignore[method-assign]
    return app


SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "the app's token"},
    "basic": {"type": "http", "scheme": "basic", "description": "any user, the token as password"},
}


def documented_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus what it cannot see: /v1/diagnose reads its body by hand (JSON,
    or multipart with an `mri` upload), and every route but /healthz needs the token."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title="radiag", version="1", routes=app.routes)
    components = schema.setdefault("components", {})
    components["securitySchemes"] = SECURITY_SCHEMES
    models = components.setdefault("schemas", {})
    for model in (DiagnoseRequest, DiagnoseResponse):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        models |= body.pop("$defs", {}) | {model.__name__: body}
    request = {"$ref": "#/components/schemas/DiagnoseRequest"}
    multipart = {
        "type": "object",
        "required": ["request"],
        "properties": {
            "request": {"type": "string", "contentMediaType": "application/json",
                        "description": "a DiagnoseRequest as JSON"},
            "mri": {"type": "string", "format": "binary", "description": "a T1 NIfTI (.nii.gz)"},
        },
    }  # fmt: skip
    diagnose = schema["paths"]["/v1/diagnose"]["post"]
    diagnose["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": request},
                    "multipart/form-data": {"schema": multipart}},
    }  # fmt: skip
    diagnose["responses"]["200"]["content"] = {
        "application/json": {"schema": {"$ref": "#/components/schemas/DiagnoseResponse"}}
    }
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            operation["security"] = [] if path in OPEN_ROUTES else [{"bearer": []}, {"basic": []}]
    app.openapi_schema = schema
    return schema


class RadiagIngress(OpenAiIngress):
    """The OpenAI-compatible teacher routes (inherited) and radiag's own routes."""

    def __init__(
        self,
        llm_deployments: dict[str, DeploymentHandle],
        model_cards: dict[str, Any],
        *,
        serve_config: dict[str, Any],
        diagnosers: dict[str, DeploymentHandle],
        lora_paths: dict[str, str] | None = None,
    ) -> None:
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self.cfg = ServeConfig.model_validate(serve_config)
        self.store = RunStore(self.cfg.run_dir)
        self.describe_cfg = describe_config(self.store)
        self.norm = run_norm(self.store, self.describe_cfg)  # read once, not per request
        self.models = served_models(self.cfg, self.store)
        self.fields = {
            name: model_fields(name, card["kind"], self.describe_cfg)
            for name, card in self.models.items()
        }
        self.diagnosers = diagnosers
        self.identities: dict[str, str] = {}
        self.admission = {name: AdmissionLimit(INGRESS_MAX_ONGOING) for name in self.models}

    # -- open and operational routes -------------------------------------------------
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    async def readyz(self) -> JSONResponse:
        """Ready when every model deployment has a running replica; names those that do not.
        Asks Serve's controller, not the replicas: a busy model is ready, and this answers
        at once however long the models' queues are."""
        deployments = await asyncio.to_thread(_running_replicas)
        waiting = [
            name
            for name, handle in self.diagnosers.items()
            if deployments.get(handle.deployment_name, 0) == 0
        ]
        status = 503 if waiting else 200
        return JSONResponse({"ready": not waiting, "waiting": waiting}, status_code=status)

    async def metrics(self) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    async def diagnose_models(self) -> dict[str, Any]:
        identities = await asyncio.gather(*(self._identity(name) for name in self.models))
        cards = [
            {"name": name, **card, "identity": identity, "fields": self.fields[name]}
            for (name, card), identity in zip(self.models.items(), identities, strict=True)
        ]
        # The page offers an MRI location only where the server may read one.
        return {"models": cards, "mri_locations": bool(self.cfg.limits.allowed_mri_prefixes)}

    async def examples(self) -> dict[str, Any]:
        """A few test-split patients as records, offered only for a synthetic cohort."""
        cohort = read_record(self.store, COHORT_STAGE)
        synthetic = cohort is not None and cohort.identity.config.get("source") == "synthetic"
        if self.cfg.limits.examples == 0 or not synthetic:
            return {"examples": []}  # never real patients' records
        table = self.store.read_table("splits/test.parquet")
        names = [c.name for c in SERVED_COLUMNS if c.name not in IDENTIFIERS]
        rows = table.slice(0, self.cfg.limits.examples).to_pylist()
        return {
            "examples": [
                {
                    "name": row["patient_id"],
                    "patient": {k: row[k] for k in names if row.get(k) is not None},
                }
                for row in rows
            ]
        }

    async def exemplar(self, patient_id: str) -> Any:
        """A training patient the teacher may show as an exemplar: its description (what
        the teacher read) and label. Only the training split: the page links the exemplars
        of an answer here."""
        train = self.store.read_table("splits/train.parquet")
        train = train.filter(pc.equal(train["patient_id"], patient_id))
        if train.num_rows == 0 or train["label"][0].as_py() is None:
            return _error(404, "no labelled training patient has that id")
        return train.select(["patient_id", "label", "description"]).to_pylist()[0]

    async def model_data(self, model: str) -> Any:
        """The teacher's model card; an unknown model is a plain 404 (no internals)."""
        card = await self.model(model)
        if card is None:
            return openai_error(404, f"model {model!r} is not served", "model_not_found")
        return card

    # -- diagnosis ---------------------------------------------------------------------
    async def diagnose(self, request: Request) -> Response:
        parsed = await self._read_request(request)
        if isinstance(parsed, Response):
            return parsed
        body, nifti = parsed
        request.state.model = body.model if body.model in self.models else "unknown"
        if body.model not in self.models:
            return _error(404, f"model {body.model!r} is not served; see /v1/diagnose/models")
        if body.mri_uri is not None and nifti is None:
            nifti = self._read_uri(body.mri_uri)
            if isinstance(nifti, Response):
                return nifti
        limit = self.admission[body.model]
        if not limit.try_admit():  # would wait past its deadline: refused now, not at it
            return _busy(body.model, limit.retry_after_s)
        start, outcome = time.perf_counter(), "failed"
        try:
            described = describe_record(body.patient, self.describe_cfg, self.norm, body.patient_id)
            description = described["description"][0].as_py()
            answer = await asyncio.wait_for(
                self._ask(body.model, described, description, nifti, body.patient_id),
                timeout=self.cfg.limits.request_timeout_s,
            )
            outcome = "answered"
        except (BackPressureError, ActorDiedError):  # full queue, or a replica being replaced
            return _busy(body.model, 1)
        except TimeoutError:  # the answer is abandoned: Serve cancels the request
            outcome = "late"
            return _error(504, f"{body.model} did not answer within the request timeout")
        except Exception:  # a model's own failure: logged here, not echoed to the client
            log.exception("%s failed on %r", body.model, body.patient_id)
            return _error(500, f"{body.model} failed on this request; see the server log")
        finally:
            limit.finished(time.perf_counter() - start, outcome)
        if "error" in answer:
            return _error(422, answer["error"])
        self.identities[self._deployment_of(body.model)] = answer["identity"]
        argued, warnings = answer_warnings(
            body.patient, answer.get("rationale"), answer.get("diagnosis")
        )
        response = DiagnoseResponse(
            model=body.model,
            patient_id=body.patient_id,
            description=description,
            latency_s=time.perf_counter() - start,
            argued_class=argued,
            warnings=warnings,
            **{k: v for k, v in answer.items() if k in MODEL_FIELDS},
        )
        log.info("diagnosed %r with %s", body.patient_id, body.model)  # ids only, no data
        return JSONResponse(response.model_dump(mode="json"))

    async def _ask(
        self, model: str, described: Any, description: str, nifti: bytes | None, patient_id: str
    ) -> dict[str, Any]:
        kind = self.models[model]["kind"]
        if kind == "teacher":
            return await self.diagnosers["teacher"].remote(description, patient_id)
        if kind == "student":
            return await self.diagnosers[model].remote(StudentRequest(description, nifti))
        return await self.diagnosers["baselines"].remote(model, described.to_pylist()[0])

    async def _identity(self, name: str) -> str:
        """The stage identity a deployment serves now (a hot swap changes a student's): asked
        with a short deadline, so that a busy model's listing does not wait for its queue;
        then the last identity it answered with."""
        key = self._deployment_of(name)
        with contextlib.suppress(TimeoutError):
            self.identities[key] = await asyncio.wait_for(
                self.diagnosers[key].check_ready.remote(), timeout=IDENTITY_WAIT_S
            )
        return self.identities.get(key, "")

    def _deployment_of(self, model: str) -> str:
        """The key in `diagnosers` of the deployment that answers for `model`."""
        return "baselines" if self.models[model]["kind"] == "baseline" else model

    async def _read_request(
        self, request: Request
    ) -> tuple[DiagnoseRequest, bytes | None] | Response:
        """JSON body, or multipart with a `request` JSON field and an `mri` file; 413 / 422."""
        limits = self.cfg.limits
        body_bytes = await read_at_most(request, int(limits.max_upload_mb * 2**20))
        if body_bytes is None:  # chunked bodies declare no length: counted as they arrive
            return _error(413, f"request larger than {limits.max_upload_mb} MB")
        nifti = None
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                form = await Request(request.scope, _replay(body_bytes)).form()
                raw = form.get("request")
                if not isinstance(raw, str):
                    return _error(
                        422, [{"loc": ["request"], "msg": "missing JSON field", "type": "missing"}]
                    )
                upload = form.get("mri")
                if upload is not None and not isinstance(upload, str):
                    nifti = await upload.read()
                body = DiagnoseRequest.model_validate_json(raw)
            else:
                body = DiagnoseRequest.model_validate_json(body_bytes)
        except ValidationError as err:
            return _validation_error(err)
        except Exception as err:  # a malformed multipart body
            return _error(422, f"cannot read the request: {type(err).__name__}")
        if nifti is not None and (refused := self._refused_volume(nifti, "mri")):
            return refused
        return body, nifti

    def _refused_volume(self, data: bytes, field: str) -> Response | None:
        """413 for a NIfTI that gunzips past `limits.max_volume_mb`, 422 for one that is not
        a 3-D volume, None for a usable one (checked before any model sees it)."""
        limit_mb = self.cfg.limits.max_volume_mb
        try:
            plain = gunzip_at_most(data, int(limit_mb * 2**20))
        except VolumeTooLarge:
            return _error(413, f"{field}: the NIfTI expands to more than {limit_mb} MB")
        except zlib.error:
            msg = "not a whole gzip file"
            return _error(422, [{"loc": [field], "msg": msg, "type": "value_error"}])
        if problem := nifti_problem(plain):
            return _error(422, [{"loc": [field], "msg": problem, "type": "value_error"}])
        return None

    def _read_uri(self, uri: str) -> bytes | Response:
        """A T1 from storage, only under an allowed prefix (403 otherwise)."""
        prefixes = self.cfg.limits.allowed_mri_prefixes
        normalised = uri if uri.startswith("s3://") else str(Path(uri).resolve())
        if ".." in uri.split("/") or not any(normalised.startswith(p) for p in prefixes):
            return _error(403, "mri_uri is outside the allowed storage prefixes")
        try:
            fs, path = filesystem_for(normalised)
            with fs.open_input_stream(path, compression=None) as stream:
                data = stream.read(int(self.cfg.limits.max_upload_mb * 2**20) + 1)
        except (FileNotFoundError, OSError):
            return _error(
                422, [{"loc": ["mri_uri"], "msg": "cannot read the file", "type": "value_error"}]
            )
        if len(data) > self.cfg.limits.max_upload_mb * 2**20:
            return _error(413, f"MRI larger than {self.cfg.limits.max_upload_mb} MB")
        return self._refused_volume(data, "mri_uri") or data


async def read_at_most(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _replay(body: bytes) -> Callable[[], Any]:
    """An ASGI `receive` that hands over a body already read (to parse it as a form)."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


class VolumeTooLarge(ValueError):
    """A gzip stream that expands past its limit."""


def gunzip_at_most(data: bytes, limit: int) -> bytes:
    """`data` gunzipped (plain bytes pass through), never inflating more than `limit` + 1
    bytes: a few MB of gzip can hold gigabytes of zeros."""
    if data[:2] != b"\x1f\x8b":
        return data
    inflater = zlib.decompressobj(wbits=31)  # 31: gzip framing
    plain = inflater.decompress(data, limit + 1)
    if len(plain) > limit:
        raise VolumeTooLarge(f"expands past {limit} bytes")
    if not inflater.eof:
        raise zlib.error("the gzip stream ends early")
    return plain


def _running_replicas() -> dict[str, int]:
    """Deployment -> RUNNING replicas of this app, from Serve's controller."""
    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return {}
    return {name: d.replica_states.get("RUNNING", 0) for name, d in app.deployments.items()}


def nifti_problem(data: bytes) -> str | None:
    """Why plain NIfTI bytes are not a volume the MRI student can use, or None: the batch
    stages' own check (one 3-D volume, every voxel readable and finite, a usable affine)."""
    from radiag.cohort.mri import decode_nifti_gz
    from radiag.students.volumes import checked_voxels

    try:
        checked_voxels(decode_nifti_gz(data))
    except ValueError as err:
        return str(err)
    except Exception as err:  # nibabel: a header or data it cannot read
        return f"not a NIfTI file ({type(err).__name__})"
    return None


ROUTES = {
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "healthz": lambda app: app.get("/healthz"),
    "readyz": lambda app: app.get("/readyz"),
    "metrics": lambda app: app.get("/metrics"),
    "page": lambda app: app.get("/", response_class=HTMLResponse),
    "diagnose_models": lambda app: app.get("/v1/diagnose/models"),
    "examples": lambda app: app.get("/v1/examples"),
    "exemplar": lambda app: app.get("/v1/exemplars/{patient_id}"),
    "diagnose": lambda app: app.post("/v1/diagnose"),
}


def teacher_cpus(llm_config: Any, teacher: TeacherServeConfig) -> float:
    """CPUs the teacher's minimum replicas reserve: the placement group `ray.serve.llm`
    gives each replica (one CPU per engine worker on CPU; the replica actor takes none)."""
    from ray.llm._internal.serve.core.server.llm_server import LLMServer

    bundles = LLMServer.get_deployment_options(llm_config).get("placement_group_bundles", [])
    return teacher.min_replicas * sum(bundle.get("CPU", 0.0) for bundle in bundles)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder: `serve run radiag.serving.app:build_app run_dir=...`."""
    cfg = ServeConfig.model_validate(args)
    token = read_token(cfg)
    store = RunStore(cfg.run_dir)
    describe_config(store)  # fail now, not in a replica, if the run has no splits
    models = served_models(cfg, store)
    llm_config = None
    if cfg.teacher is not None:
        from radiag.serving.teacher import run_diagnose_config, teacher_llm_config

        llm_config = teacher_llm_config(cfg.teacher, run_diagnose_config(store))
    kinds = [card["kind"] for card in models.values()]
    cfg = sized_to_cluster(
        cfg,
        {"students": kinds.count("student"), "baselines": int("baseline" in kinds)},
        cluster_cpus=ray.cluster_resources().get("CPU", 0.0),
        teacher_cpus=0.0 if llm_config is None else teacher_cpus(llm_config, cfg.teacher),
    )
    diagnosers: dict[str, Any] = {}
    for name, card in models.items():
        if card["kind"] == "student":
            kind = name.removeprefix("student-")
            students = cfg.students
            decoding = students.diagnose or student_diagnose_config(store, kind)
            diagnosers[name] = StudentServer.options(
                name=f"student-{kind}",
                user_config={"run_dir": students.source_run or store.uri,
                             **students.batching.model_dump()},
                **students.scaling.deployment_options(),
            ).bind(kind, students.threads_per_replica, decoding.model_dump())  # fmt: skip
    if "baseline" in kinds:
        diagnosers["baselines"] = BaselineServer.options(
            name="baselines", **cfg.baselines.scaling.deployment_options()
        ).bind(store.uri, cfg.baselines.batching.model_dump())
    llm_deployments, model_cards = {}, {}
    if cfg.teacher is not None:
        from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
        from ray.serve.llm import build_llm_deployment

        from radiag.serving.teacher import TeacherServer

        llm = build_llm_deployment(llm_config)
        llm_deployments = {cfg.teacher.model_id: llm}
        model_cards = {cfg.teacher.model_id: to_model_metadata(cfg.teacher.model_id, llm_config)}
        diagnosers["teacher"] = TeacherServer.bind(
            store.uri, llm, cfg.teacher.model_dump(mode="json")
        )
    ingress = make_fastapi_ingress(RadiagIngress, endpoint_map=ROUTES, app=build_fastapi(token))
    return serve.deployment(
        ingress,
        name="ingress",
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=cfg.limits.request_timeout_s,
    ).bind(
        llm_deployments=llm_deployments,
        model_cards=model_cards,
        serve_config=cfg.model_dump(mode="json"),
        diagnosers=diagnosers,
    )


APP_NAME = "radiag"


def application(cfg: ServeConfig, deployments: list[dict[str, Any]] | None = None) -> dict:
    """The app as an entry of Serve's config file (`applications:` of serve/config.yaml)."""
    return {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": "radiag.serving.app:build_app",
        "args": cfg.model_dump(mode="json"),
        "deployments": deployments or [],
    }


def check_servable(cfg: ServeConfig) -> None:
    """What `build_app` checks of the run, here and now: a run it cannot serve fails in
    one line, before Serve's build task (which Ray retries three times) would.

    Raises:
        ConfigurationError: no splits, or models that are not the run's.
        FileNotFoundError: the teacher is asked for and the run has no diagnose stage.
    """
    store = RunStore(cfg.run_dir)
    describe_config(store)
    served_models(cfg, store)
    if cfg.teacher is not None:
        from radiag.serving.teacher import run_diagnose_config

        run_diagnose_config(store)


def deploy(
    cfg: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    deployments: list[dict[str, Any]] | None = None,
    timeout_s: float = 900,
    on_wait: Callable[[str], None] = log.warning,
) -> str:
    """Deploy the app as `serve deploy` does (a config, built on the cluster) and wait until
    it runs; returns its URL. Redeploying the same `cfg` with only `deployments` overrides
    (user_config) updates the replicas in place; other `cfg` restarts them.

    A deployment whose replicas cannot be scheduled is named to `on_wait` with what it
    needs and what the cluster has, once, as soon as Serve reports it (after about 30 s),
    and again in the `TimeoutError` if the app never runs; the app is then removed."""
    from ray.serve.context import _get_global_client  # the client behind `serve deploy`
    from ray.serve.schema import ServeDeploySchema

    serve.start(http_options={"host": host, "port": port})
    config = ServeDeploySchema.model_validate({"applications": [application(cfg, deployments)]})
    _get_global_client().deploy_apps(config)
    deadline = time.monotonic() + timeout_s
    waiting: dict[str, str] = {}
    while (
        status := serve.status().applications.get(APP_NAME)
    ) is None or status.status != "RUNNING":
        if status is not None and status.status == "DEPLOY_FAILED":
            cause = status.message.strip().splitlines()[-1]  # the exception, not its trace
            raise ConfigurationError(f"the app failed to deploy: {cause} (`serve status`: all)")
        for name, line in unschedulable(status).items():
            if name not in waiting:
                waiting[name] = line
                on_wait(line)
        if time.monotonic() > deadline:
            serve.delete(APP_NAME, _blocking=False)  # nothing half-deployed holds the cluster
            waits = "".join(f"\n{line}" for line in waiting.values())
            raise TimeoutError(f"the app was not running after {timeout_s:.0f} s; removed{waits}")
        time.sleep(1)
    return f"http://{host}:{port}"


def unschedulable(status: Any) -> dict[str, str]:
    """Deployment -> Serve's own line on its replicas waiting for resources (the line
    names the resources one replica needs and those the cluster has free)."""
    if status is None:
        return {}
    return {
        name: f"{name} waits for resources: {deployment.message}"
        for name, deployment in status.deployments.items()
        if "to be scheduled" in deployment.message
    }


def student_swap(cfg: ServeConfig, source_run: str) -> list[dict[str, Any]]:
    """`deployments` overrides that hot-swap every served student to `source_run`'s:
    only their user_config changes, so each replica reloads in place (`reconfigure`)."""
    batching = cfg.students.batching.model_dump()
    kinds = [
        k for k in STUDENT_KINDS if f"student-{k}" in served_models(cfg, RunStore(cfg.run_dir))
    ]
    return [
        {"name": f"student-{kind}", "user_config": {"run_dir": source_run, **batching}}
        for kind in kinds
    ]
