"""The `openai` backend against a real vLLM OpenAI-compatible server (tiny random model).

Slow: the server takes ~25 s to start on 2 cores; it is started once for the module,
with `--api-key`, so every test also checks that the key from the environment is sent.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from radiag.teacher.engines import Completion, OpenAIEngineConfig, SamplingConfig
from radiag.teacher.openai_engine import OpenAIEngine

pytestmark = pytest.mark.slow

KEY_ENV = "RADIAG_TEST_OPENAI_KEY"
SAMPLING = SamplingConfig(max_tokens=16)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real vLLM API server on a free loopback port; yields its /v1 base URL."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("vllm-server") / "server.log").open("w")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "1024", "--enforce-eager", "--dtype", "bfloat16", "--api-key", "secret"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"vLLM server did not start:\n{Path(log.name).read_text()[-3000:]}")
                time.sleep(0.5)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(KEY_ENV, "secret")
            yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server spawns an engine process: kill the group
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def engine(base_url: str, **overrides) -> OpenAIEngine:
    return OpenAIEngine(
        OpenAIEngineConfig(base_url=base_url, model="tiny", api_key_env=KEY_ENV, **overrides)
    )


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


class CountingProxy:
    """A real HTTP proxy in front of the server that records what the server is sent:
    when each request arrives and the most requests in flight at once. While `unavailable`
    it answers 503 itself, as an overloaded endpoint does."""

    def __init__(self, upstream: str) -> None:
        self.unavailable = False
        self.arrivals: list[float] = []
        self.in_flight = self.peak = 0
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if proxy.unavailable:
                    self.rfile.read(int(self.headers["Content-Length"]))
                    self.send_error(503, "Service Unavailable")
                    return
                with lock:
                    proxy.arrivals.append(time.monotonic())
                    proxy.in_flight += 1
                    proxy.peak = max(proxy.peak, proxy.in_flight)
                try:
                    body = self.rfile.read(int(self.headers["Content-Length"]))
                    headers = {k: self.headers[k] for k in ("Content-Type", "Authorization")}
                    request = urllib.request.Request(upstream + self.path, body, headers)
                    with urllib.request.urlopen(request) as response:
                        status, data = response.status, response.read()
                finally:
                    with lock:
                        proxy.in_flight -= 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 64  # the default backlog (5) drops bursts: 1 s SYN retries

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proxy(server: str) -> Iterator[CountingProxy]:
    proxy = CountingProxy(server.removesuffix("/v1"))
    yield proxy
    proxy.close()


def test_batch_returns_completions_in_order_with_usage(server: str) -> None:
    conversations = [chat("describe the patient " * (i + 1)) for i in range(6)]
    out = engine(server).generate(conversations, SAMPLING)
    assert len(out) == 6 and all(c.error is None for c in out)
    prompt_tokens = [c.prompt_tokens for c in out]
    assert prompt_tokens == sorted(set(prompt_tokens))  # longer prompt, later slot: order kept
    for c in out:
        assert 0 < c.completion_tokens <= 16 and c.finish_reason in {"length", "stop"}
        assert c.text and c.latency_s > 0


def test_too_long_prompt_fails_alone(server: str) -> None:
    conversations = [chat("short"), chat("far too long " * 2000), chat("also short")]
    out = engine(server, max_retries=3).generate(conversations, SAMPLING)
    assert out[0].error is None and out[2].error is None and out[0].text and out[2].text
    bad = out[1]
    assert bad.text == "" and bad.error.startswith("HTTP 400: ")
    assert not bad.transient and not out[0].transient  # a rerun cannot fix a too-long prompt
    assert "1024" in bad.error and "context" in bad.error.lower() and len(bad.error) <= 520
    assert bad.latency_s < 5  # a 400 is not retried


def test_extra_body_structured_output_is_honoured(server: str) -> None:
    regex = r"Final Diagnosis: \((A|B|C)\)"
    extra = {"structured_outputs": {"regex": regex}}
    out = engine(server, extra_body=extra).generate([chat("diagnose"), chat("again")], SAMPLING)
    assert all(c.error is None and re.fullmatch(regex, c.text) for c in out), out


def test_connection_failure_is_retried_then_reported() -> None:
    dead = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    start = time.monotonic()
    out = engine(dead, max_retries=2, timeout_s=2).generate([chat("a"), chat("b")], SAMPLING)
    elapsed = time.monotonic() - start
    for c in out:
        assert c.text == "" and "connection failed" in c.error and c.error.endswith("[attempts: 3]")
        assert c.transient  # the next run of the stage retries it
    assert 0.75 <= elapsed < 10  # two backoffs (>= 0.25 s + 0.5 s), then give up


def test_timeout_is_retried_then_reported() -> None:
    with socket.socket() as hung:  # accepts connections (kernel backlog), never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/v1"
        start = time.monotonic()
        out = engine(url, max_retries=1, timeout_s=0.3).generate([chat("a")], SAMPLING)
    assert out[0].error == "request timed out [attempts: 2]" and out[0].transient
    assert 0.6 <= time.monotonic() - start < 5


def test_generate_works_inside_a_running_event_loop(server: str) -> None:
    async def caller() -> list[Completion]:
        return engine(server).generate([chat("a")], SAMPLING)

    assert asyncio.run(caller())[0].error is None


def test_max_concurrency_bounds_requests_the_server_sees(proxy: CountingProxy) -> None:
    sampling = SamplingConfig(max_tokens=64)
    out = engine(proxy.url + "/v1", max_concurrency=2).generate([chat("x")] * 8, sampling)
    assert all(c.error is None for c in out) and len(proxy.arrivals) == 8
    assert proxy.peak == 2
    # The proxy does see more when the engine allows more: the bound above is real.
    proxy.peak = 0
    engine(proxy.url + "/v1", max_concurrency=8).generate([chat("x")] * 8, sampling)
    assert proxy.peak > 2


def test_requests_per_second_spaces_requests(proxy: CountingProxy) -> None:
    start = time.monotonic()
    out = engine(proxy.url + "/v1", requests_per_second=5).generate([chat("x")] * 4, SAMPLING)
    assert all(c.error is None for c in out) and len(proxy.arrivals) == 4
    # Sends start 1/5 s apart: the 4th cannot reach the server before 3/5 s. The first
    # arrival also carries connection set-up, so the span between arrivals gets slack.
    assert proxy.arrivals[-1] - start >= 0.6 and proxy.arrivals[-1] - proxy.arrivals[0] > 0.4


def test_api_key_comes_from_the_environment(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert engine(server).generate([chat("a")], SAMPLING)[0].error is None
    monkeypatch.setenv(KEY_ENV, "wrong")
    assert engine(server).generate([chat("a")], SAMPLING)[0].error == "HTTP 401: Unauthorized"
    monkeypatch.delenv(KEY_ENV)  # unset: "EMPTY", which this server refuses too
    assert engine(server).generate([chat("a")], SAMPLING)[0].error == "HTTP 401: Unauthorized"


def test_the_rationalize_stage_runs_through_an_openai_endpoint(
    server: str, tmp_path: Path, ray_cluster: None
) -> None:
    """The same stage, the other backend: rows written with engine 'openai' and its model name."""
    from radiag.cohort.describe import DescribeConfig
    from radiag.cohort.split import SplitConfig
    from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
    from radiag.cohort.synthetic import SynthConfig
    from radiag.store import RunStore
    from radiag.teacher.stages import RationalizeConfig, read_output, teacher_stage

    store = RunStore(str(tmp_path))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=30, max_visits=1)), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    endpoint = OpenAIEngineConfig(base_url=server, model="tiny", api_key_env=KEY_ENV, batch_size=3)
    cfg = RationalizeConfig(
        engine=endpoint, sampling=SamplingConfig(temperature=1.0, max_tokens=12), limit=6
    )
    summary = teacher_stage("rationalize", cfg, store)
    out = read_output(store, "rationalize").to_pandas()
    assert summary.counts["rows"] == 6 and summary.counts["errors"] == 0
    assert set(out["engine"]) == {"openai"} and set(out["model"]) == {"tiny"}
    assert (out["completion_tokens"] > 0).all()


@pytest.mark.parametrize("batches_in_flight", [1, 3])
def test_a_replica_works_on_batches_in_flight_at_once(
    batches_in_flight: int, proxy: CountingProxy, tmp_path: Path, ray_cluster: None
) -> None:
    """The engine is fed from several batches at once, so it never waits for the slowest
    row of one block; with one batch in flight it sees at most that batch's rows."""
    from radiag.cohort.describe import DescribeConfig
    from radiag.cohort.split import SplitConfig
    from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
    from radiag.cohort.synthetic import SynthConfig
    from radiag.store import RunStore
    from radiag.teacher.stages import RationalizeConfig, read_output, teacher_stage

    store = RunStore(str(tmp_path))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=30, max_visits=1)), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    endpoint = OpenAIEngineConfig(
        base_url=f"{proxy.url}/v1", model="tiny", api_key_env=KEY_ENV, max_concurrency=8,
        batch_size=2, batches_in_flight=batches_in_flight,
    )  # fmt: skip
    cfg = RationalizeConfig(
        engine=endpoint, sampling=SamplingConfig(max_tokens=64), limit=6, regeneration_attempts=0
    )
    summary = teacher_stage("rationalize", cfg, store)
    assert summary.counts["rows"] == 6 and summary.counts["errors"] == 0
    assert (
        len(store.list_files("rationales", ".parquet")) == 3
    )  # one part file per batch, as before
    assert len(set(read_output(store, "rationalize")["patient_id"].to_pylist())) == 6
    if batches_in_flight == 1:
        assert proxy.peak <= 2
    else:
        assert proxy.peak > 2


def test_rows_that_failed_transiently_are_retried_by_the_next_run(
    proxy: CountingProxy, tmp_path: Path, ray_cluster: None
) -> None:
    """An endpoint answering 503 leaves transient errors; the same stage run again (same
    identity) generates exactly those rows, counts them as retried, and duplicates none."""
    from radiag.cohort.describe import DescribeConfig
    from radiag.cohort.split import SplitConfig
    from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
    from radiag.cohort.synthetic import SynthConfig
    from radiag.store import RunStore
    from radiag.teacher.stages import RationalizeConfig, read_output, teacher_stage

    store = RunStore(str(tmp_path))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=30, max_visits=1)), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    endpoint = OpenAIEngineConfig(
        base_url=f"{proxy.url}/v1", model="tiny", api_key_env=KEY_ENV, batch_size=2, max_retries=0
    )
    cfg = RationalizeConfig(engine=endpoint, sampling=SamplingConfig(max_tokens=8), limit=4)

    proxy.unavailable = True
    failed = teacher_stage("rationalize", cfg, store)
    assert failed.counts["errors"] == 4 == failed.counts["retry_pending"]
    assert all("HTTP 503" in e for e in read_output(store, "rationalize")["error"].to_pylist())

    proxy.unavailable = False
    retried = teacher_stage("rationalize", cfg, store)
    out = read_output(store, "rationalize")
    assert retried.counts["retried"] == 4 == retried.counts["generated_now"]
    assert retried.counts["errors"] == 0 == retried.counts["retry_pending"]
    assert out.num_rows == 4 == len(set(out["patient_id"].to_pylist()))
