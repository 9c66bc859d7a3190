"""How the served students behave under load: they scale out and back in, a newer run's
student swaps in while requests keep being answered, and a full queue is answered 503 at
once rather than left to time out.

Each test deploys the app over the session's finished run with the scaling it needs, on
the session's 2-CPU local Ray cluster, and drives it with real HTTP clients in threads.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TOKEN, ServedApp, start_app

from radiag.contract import read_record
from radiag.store import RunStore
from radiag.students.config import distill_stage

APP = "radiag"
DIAGNOSE = {"model": "student-text", "patient": {"AGE": 70, "MMSE": 25}}
TEXT_ONLY = ["student-text"]  # the other models of the run are not deployed: quicker deploys


def running_replicas(deployment: str = "student-text") -> int:
    """RUNNING replicas of one deployment of the app, as the Serve controller reports them."""
    from ray import serve

    states = serve.status().applications[APP].deployments[deployment].replica_states
    return states.get("RUNNING", 0)  # ReplicaState is a str enum: "RUNNING" is its key


def replica_ids() -> dict[str, list[str]]:
    """Replica ids of every deployment of the app (a restart changes them)."""
    from ray.serve.context import _get_global_client

    deployments = _get_global_client().get_serve_details()["applications"][APP]["deployments"]
    return {name: sorted(r["replica_id"] for r in d["replicas"]) for name, d in deployments.items()}


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition()` held, polled every half second; fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - start


def text_identity(store: RunStore) -> str:
    record = read_record(store, distill_stage("text"))
    assert record is not None and record.status == "complete"
    return record.fingerprint


@dataclass
class Answer:
    thread: int
    status: int  # 0: no HTTP answer at all (connection error, client timeout)
    seconds: float
    body: dict[str, Any] = field(default_factory=dict)


def post_diagnose(client: httpx.Client, index: int, body: dict[str, Any] = DIAGNOSE) -> Answer:
    """One POST /v1/diagnose, timed; a body that is not JSON (Serve's own 500) is kept as text."""
    start = time.perf_counter()
    try:
        r = client.post("/v1/diagnose", json=body)
    except httpx.HTTPError as err:
        return Answer(index, 0, time.perf_counter() - start, {"error": repr(err)})
    try:
        answer = r.json()
    except ValueError:
        answer = {"text": r.text[:200]}
    return Answer(index, r.status_code, time.perf_counter() - start, answer)


class Load:
    """`threads` clients, each posting `body` back to back until `stop()`; every answer kept."""

    def __init__(
        self, app: ServedApp, threads: int, body: dict[str, Any] = DIAGNOSE, timeout: float = 120
    ) -> None:
        self.app, self.body, self.timeout = app, body, timeout
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 30)
        assert not any(t.is_alive() for t in self._threads), "a load client did not finish"

    def count(self, predicate: Callable[[Answer], bool] = lambda a: True) -> int:
        with self._lock:
            return sum(1 for a in self.answers if predicate(a))

    def _loop(self, index: int) -> None:
        with self.app.client(timeout=self.timeout) as client:
            while not self._stop.is_set():
                answer = post_diagnose(client, index, self.body)
                with self._lock:
                    self.answers.append(answer)


@pytest.fixture
def deploy(trained_run: Path) -> Iterator[Callable[..., ServedApp]]:
    """Deploys the app over a run with the given args; Serve is shut down after the test.

    Serve listens on one port per cluster: the session's `served_app` (the API and page
    tests, which run before this file) is shut down first."""
    from ray import serve

    serve.shutdown()
    started = False

    def _deploy(args: dict[str, Any], run: Path = trained_run) -> ServedApp:
        nonlocal started
        started = True
        return ServedApp(start_app(run, args), TOKEN, run)

    yield _deploy
    if started:
        serve.shutdown()


@pytest.fixture
def newer_run(trained_run: Path, tiny_student: Callable[..., Any], tmp_path: Path) -> Path:
    """A copy of the run whose text student was trained again, with another seed: what a
    newer training run would publish."""
    from radiag.students.distill import run_distill

    run = tmp_path / "newer"
    shutil.copytree(trained_run, run)
    cfg = tiny_student(optim={"max_steps": 2, "batch_size": 4}, seed=1)
    run_distill("text", cfg, RunStore(str(run)), fresh=True)
    return run


@pytest.mark.slow
def test_the_text_student_scales_out_under_load_and_back_in_when_it_stops(deploy):
    scaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 0,
        "downscale_delay_s": 5,
        "look_back_period_s": 5,  # Serve's 30 s would hold the second replica that long
        "num_cpus": 0.25,
    }
    app = deploy({"models": TEXT_ONLY, "students": {"scaling": scaling}})
    assert running_replicas() == 1

    with Load(app, threads=8) as load:
        scaled_out = wait_until(lambda: running_replicas() == 2, 120, "a second replica")
        served_by_two = load.count()
        wait_until(lambda: load.count() >= served_by_two + 8, 120, "answers from two replicas")
    print(f"scaled out after {scaled_out:.1f} s of load, {load.count()} answers")

    statuses = [a.status for a in load.answers]
    assert statuses and set(statuses) == {200}, [a for a in load.answers if a.status != 200]
    assert {a.body["model"] for a in load.answers} == {"student-text"}

    scaled_in = wait_until(lambda: running_replicas() == 1, 120, "back to one replica")
    print(f"scaled back in {scaled_in:.1f} s after the load stopped")
    assert running_replicas("student-text") == 1
    with app.client() as client:
        assert client.post("/v1/diagnose", json=DIAGNOSE).status_code == 200


@pytest.mark.slow
def test_a_newer_runs_student_swaps_in_place_without_a_failed_request(
    deploy, trained_run, newer_run
):
    from radiag.serving.app import deploy as redeploy
    from radiag.serving.app import student_swap
    from radiag.serving.config import ServeConfig

    old, new = text_identity(RunStore(str(trained_run))), text_identity(RunStore(str(newer_run)))
    assert old != new
    args = {"models": TEXT_ONLY, "students": {"scaling": {"max_replicas": 1, "num_cpus": 0.25}}}
    app = deploy(args)
    with app.client() as client:
        assert client.post("/v1/diagnose", json=DIAGNOSE).json()["identity"] == old
    before = replica_ids()

    with Load(app, threads=2) as load:
        wait_until(lambda: load.count() >= 4, 120, "answers before the swap")
        # The same args with a user_config override, as `serve deploy` of serve/config.yaml
        # with a `deployments:` entry does: Serve calls reconfigure on the running replicas.
        cfg = ServeConfig.model_validate(
            {"run_dir": str(trained_run), "token_file": str(trained_run.parent / "serve-token")}
            | args
        )
        start = time.monotonic()
        redeploy(cfg, port=int(app.url.rsplit(":", 1)[1]),
                 deployments=student_swap(cfg, str(newer_run)))  # fmt: skip
        swapped = time.monotonic() - start
        wait_until(
            lambda: load.count(lambda a: a.body.get("identity") == new) >= 4,
            120,
            "answers of the newer student",
        )
    slowest = max(a.seconds for a in load.answers)
    print(f"swapped in {swapped:.1f} s; {load.count()} answers, slowest {slowest:.1f} s")

    assert replica_ids() == before  # the same replicas: reconfigured, not replaced
    failed = [a for a in load.answers if a.status != 200]
    assert not failed, failed
    assert {a.body["identity"] for a in load.answers} == {old, new}
    for thread in range(2):  # each client sees the old student, then only the new one
        seen = [a.body["identity"] for a in load.answers if a.thread == thread]
        assert seen == sorted(seen, key=lambda identity: identity == new), seen

    with app.client() as client:
        models = {m["name"]: m for m in client.get("/v1/diagnose/models").json()["models"]}
        assert models["student-text"]["identity"] == new
        assert client.post("/v1/diagnose", json=DIAGNOSE).json()["identity"] == new


@pytest.mark.reliability
@pytest.mark.slow
def test_a_full_queue_is_answered_503_at_once_and_the_student_recovers(deploy):
    scaling = {
        "min_replicas": 1,
        "max_replicas": 1,
        "max_ongoing_requests": 1,
        "max_queued_requests": 1,
        "num_cpus": 0.25,
    }
    app = deploy({"models": TEXT_ONLY, "students": {"scaling": scaling}})
    with app.client() as client:  # the replica answers before the burst
        assert client.post("/v1/diagnose", json=DIAGNOSE).status_code == 200

    burst = 24
    barrier = threading.Barrier(burst)
    answers: list[Answer] = []

    def post(index: int) -> None:
        with app.client(timeout=120) as client:
            barrier.wait(timeout=60)
            answers.append(post_diagnose(client, index))

    threads = [threading.Thread(target=post, args=(i,), daemon=True) for i in range(burst)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)
    assert len(answers) == burst, answers

    by_status = {s: [a for a in answers if a.status == s] for s in {a.status for a in answers}}
    slowest_503 = max((a.seconds for a in by_status.get(503, [])), default=None)
    print({s: len(a) for s, a in by_status.items()}, f"slowest 503: {slowest_503}")
    assert set(by_status) <= {200, 503}, answers
    assert by_status.get(503), "nothing was refused: the queue never filled"
    assert by_status.get(200), "nothing was answered"
    assert slowest_503 < 3.0, by_status[503]  # not held in a queue: the 200s take seconds
    assert all("at capacity" in a.body["detail"] for a in by_status[503])

    with app.client() as client:  # the burst is over: every request is answered again
        statuses = [client.post("/v1/diagnose", json=DIAGNOSE).status_code for _ in range(5)]
    assert statuses == [200] * 5


@pytest.mark.reliability
@pytest.mark.slow
def test_requests_that_would_only_time_out_are_refused_at_once_and_health_stays_fast(deploy):
    """96 requests, 32 at a time, to a model slower than the request timeout (here 50 ms):
    after the first missed deadlines the ingress refuses the excess with 503 + Retry-After
    at once instead of letting each wait for its 504; meanwhile /readyz and the model
    listing keep answering (the listing waits at most 0.25 s for a busy model's identity;
    the bound here leaves room for a loaded 2-core runner, the figure is in
    benchmarks/serving.py)."""
    app = deploy({"models": TEXT_ONLY, "limits": {"request_timeout_s": 0.05}})

    def post(index: int) -> Answer:
        with app.client(timeout=30) as client:
            return post_diagnose(client, index)

    probes: list[tuple[str, int, float]] = []
    with ThreadPoolExecutor(32) as pool, app.client(timeout=10) as client:
        posted = [pool.submit(post, i) for i in range(96)]
        while not all(future.done() for future in posted):
            for path in ("/readyz", "/v1/diagnose/models"):
                start = time.perf_counter()
                status = client.get(path).status_code
                probes.append((path, status, time.perf_counter() - start))
    answers = [future.result() for future in posted]
    by_status = {s: [a for a in answers if a.status == s] for s in {503, 504}}
    print({s: len(a) for s, a in by_status.items()}, f"probes: {len(probes)}")
    assert len(by_status[503]) + len(by_status[504]) == 96, answers  # no 200, 500 or hang
    # The first 32 are admitted and wait for their 504; after them the limit is down to
    # one in flight, and the excess is refused at once.
    assert len(by_status[503]) > len(by_status[504])
    # Refused without waiting in a queue (the 504s wait their deadline out). The bound has
    # room for 32 clients and the app on a loaded 2-core runner (CI saw 1.37 s); the
    # figure on a quiet machine is in benchmarks/serving.py's `admission` section.
    assert max(a.seconds for a in by_status[503]) < 3.0
    assert all("at capacity" in a.body["detail"] for a in by_status[503])
    # Same room as above (CI saw one listing take 2.1 s while the 32 clients connected);
    # a listing queued behind the model would wait out whole batches of answers instead.
    assert probes and all(status == 200 and seconds < 3.0 for _, status, seconds in probes), probes


def ongoing_requests(deployment: str = "student-text") -> int:
    """Requests a deployment's (single) replica holds now, queued or running, as the replica
    itself counts them (asked on its control thread, so a running batch does not delay it)."""
    import ray
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()["applications"][APP]["deployments"]
    (replica,) = details[deployment]["replicas"]
    actor = ray.get_actor(replica["actor_name"], namespace="serve")
    return ray.get(actor.get_num_ongoing_requests.remote(), timeout=10)


@pytest.mark.reliability
@pytest.mark.slow
def test_a_request_whose_client_is_gone_stops_its_work_and_frees_its_batch_slot(deploy):
    """16 clients post to a one-replica student that answers one request at a time and give
    up after 0.3 s (they disconnect). Their requests are cancelled all the way to the
    student: within seconds the replica holds none of them, where working through them
    would keep it busy for 16 answers' time, and the next request is answered."""
    scaling = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    students = {
        "scaling": scaling,
        "batching": {"max_batch_size": 1},
        "diagnose": {"max_new_tokens": 400},  # long answers: the queue takes a while to serve
    }
    app = deploy({"models": TEXT_ONLY, "students": students})
    with app.client() as client:
        start = time.perf_counter()
        assert client.post("/v1/diagnose", json=DIAGNOSE).status_code == 200
        one_answer_s = time.perf_counter() - start

    def post(index: int) -> Answer:
        with app.client(timeout=0.3) as client:
            return post_diagnose(client, index)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(post, range(16)))
    assert all(a.status == 0 for a in answers), answers  # every client gave up

    gone_after = wait_until(lambda: ongoing_requests() == 0, 30, "the abandoned requests")
    print(f"one answer: {one_answer_s:.2f} s; the replica was idle {gone_after:.1f} s later")
    # Serving the 15 queued requests would take about 15 answers' time; cancelled, they are
    # dropped at once and only the answer already running finishes.
    assert gone_after < max(2.0, 5 * one_answer_s)
    with app.client() as client:
        assert client.post("/v1/diagnose", json=DIAGNOSE).status_code == 200
