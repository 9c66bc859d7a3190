"""What every engine shares: its own event loop, busy-time accounting, vLLM's arguments,
the cores each CPU replica binds."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from radiag.teacher import vllm_engine
from radiag.teacher.engines import (
    AsyncEngine,
    Completion,
    Messages,
    SamplingConfig,
    Step,
    VllmEngineConfig,
    answer_with_final_line,
)
from radiag.teacher.vllm_engine import claim_cpu_binding, configure_cpu_environment, engine_args


class SleepingEngine(AsyncEngine):
    """An engine whose every request takes `seconds`; it counts requests as a real one does."""

    backend, model = "test", "sleeper"

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.loops: set[asyncio.AbstractEventLoop] = set()

    async def _complete(
        self,
        conversation: Messages,
        sampling: SamplingConfig,
        answer_prefix: str | None,
        answer_choices: Sequence[str] | None,
    ) -> Completion:
        self.loops.add(asyncio.get_running_loop())
        with self.stats.request():
            await asyncio.sleep(self.seconds)
        return Completion(conversation[0]["content"], "stop", 1, 1, self.seconds)


CHOICES = ["(A) Alzheimer's Disease", "(B) Mild Cognitive Impairment", "(C) Normal Cognition"]


class ScriptedSteps:
    """A backend's step that answers from a script and records what it was asked."""

    def __init__(self, *steps: Step | None) -> None:
        self.script, self.calls = list(steps), []

    async def __call__(
        self, lead: str, stop: list[str] | None, choices: Sequence[str] | None
    ) -> Step | None:
        self.calls.append((lead, stop, choices))
        return self.script.pop(0)


def test_the_final_line_is_one_of_the_choices_after_the_free_rationale() -> None:
    steps = ScriptedSteps(Step("MMSE 24 fits MCI.  ", "length", 5), Step(CHOICES[1], "stop", 3))
    answer = asyncio.run(answer_with_final_line(steps, "Final Diagnosis:", CHOICES))
    assert steps.calls == [("", ["Final Diagnosis:"], None), ("\nFinal Diagnosis: ", None, CHOICES)]
    assert answer.text == f"MMSE 24 fits MCI.\nFinal Diagnosis: {CHOICES[1]}"
    assert answer.finish_reason == "length"  # the rationale's: it ran out of tokens
    assert (answer.tokens, answer.final_line_tokens) == (8, 3)


def test_without_choices_the_answer_is_one_free_step() -> None:
    steps = ScriptedSteps(Step("Final Diagnosis: (C) Normal Cognition", "stop", 9))
    answer = asyncio.run(answer_with_final_line(steps, "Final Diagnosis:", None))
    assert steps.calls == [("", None, None)]
    assert (answer.text, answer.final_line_tokens) == ("Final Diagnosis: (C) Normal Cognition", 0)


def test_a_rationale_that_fills_the_context_keeps_its_text_without_a_final_line() -> None:
    steps = ScriptedSteps(Step("long rationale", "length", 90), None)
    answer = asyncio.run(answer_with_final_line(steps, "Final Diagnosis:", CHOICES))
    assert (answer.text, answer.tokens, answer.final_line_tokens) == ("long rationale", 90, 0)


def test_concurrent_requests_count_once_in_busy_time() -> None:
    engine = SleepingEngine(0.3)
    start = time.perf_counter()
    out = engine.generate(
        [[{"role": "user", "content": str(i)}] for i in range(5)], SamplingConfig()
    )
    wall = time.perf_counter() - start
    assert [c.text for c in out] == ["0", "1", "2", "3", "4"]  # in order
    totals = engine.stats.totals()
    assert totals["engine_requests"] == 5
    assert 0.3 <= totals["engine_busy_s"] <= wall < 1.0  # overlapping, not 5 x 0.3 s


def test_idle_time_between_requests_is_not_busy_time() -> None:
    engine = SleepingEngine(0.1)
    engine.generate([[{"role": "user", "content": "a"}]], SamplingConfig())
    time.sleep(0.5)
    engine.generate([[{"role": "user", "content": "b"}]], SamplingConfig())
    assert 0.2 <= engine.stats.totals()["engine_busy_s"] < 0.4


def test_complete_from_any_event_loop_runs_on_the_engines_own() -> None:
    engine = SleepingEngine(0.01)

    async def caller(text: str) -> str:
        done = await engine.complete([{"role": "user", "content": text}], SamplingConfig())
        return done.text

    assert asyncio.run(caller("first")) == "first"
    assert asyncio.run(caller("second")) == "second"  # another caller loop, same engine loop
    assert engine.loops == {engine.loop}


@pytest.mark.parametrize(
    ("gpus", "eager", "expected_eager"), [(0, None, True), (1, None, False), (1, True, True)]
)
def test_cuda_graphs_are_used_on_gpu_unless_told_otherwise(
    gpus: int, eager: bool | None, expected_eager: bool, tiny_model: Path
) -> None:
    cfg = VllmEngineConfig(
        model={"path": str(tiny_model)}, gpus_per_replica=gpus, enforce_eager=eager, dtype="float16"
    )
    assert engine_args(cfg)["enforce_eager"] is expected_eager


def test_gpu_settings_reach_the_engine_only_on_gpu(tiny_model: Path) -> None:
    gpu = VllmEngineConfig(
        model={"path": str(tiny_model)}, gpus_per_replica=2, gpu_memory_utilization=0.8,
        max_num_seqs=512, dtype="float16",
    )  # fmt: skip
    args = engine_args(gpu)
    assert args["gpu_memory_utilization"] == 0.8 and args["tensor_parallel_size"] == 2
    assert args["max_num_seqs"] == 512 and args["enable_prefix_caching"] is True
    cpu = engine_args(gpu.model_copy(update={"gpus_per_replica": 0, "max_num_seqs": None}))
    assert "gpu_memory_utilization" not in cpu and "max_num_seqs" not in cpu


@pytest.fixture
def claimed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    """This test's held bindings, released when it ends."""
    held: list = []
    monkeypatch.setattr(vllm_engine, "_claimed", held)
    yield held
    for handle in held:
        handle.close()


def test_each_cpu_replica_on_a_node_binds_cores_no_other_holds(
    tmp_path: Path, claimed: list
) -> None:
    assert claim_cpu_binding(["0", "1"], str(tmp_path)) == "0"
    assert claim_cpu_binding(["0", "1"], str(tmp_path)) == "1"
    with pytest.raises(RuntimeError, match=r"\['0', '1'\] is held .* as many bindings"):
        claim_cpu_binding(["0", "1"], str(tmp_path))


def test_a_binding_is_free_again_once_its_process_has_ended(tmp_path: Path, claimed: list) -> None:
    holder = (
        "import sys; from radiag.teacher.vllm_engine import claim_cpu_binding; "
        "print(claim_cpu_binding(['0', '1'], sys.argv[1]))"
    )
    ended = subprocess.run(
        [sys.executable, "-c", holder, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert ended.stdout.strip() == "0"
    assert claim_cpu_binding(["0", "1"], str(tmp_path)) == "0"


def test_a_replica_sets_vllm_cpu_binding_from_its_claim(
    tmp_path: Path, claimed: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")  # restored after the test
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    claim_cpu_binding(["0"], str(tmp_path))  # another replica holds core 0
    configure_cpu_environment(VllmEngineConfig(cpu_threads_bind=["0", "1"]))
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "1"
