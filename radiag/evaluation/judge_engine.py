"""The judge's engine runs in Ray actors, as the teacher's does, never in the driver.

A cluster's head node (where the driver runs) has no GPU, so the driver only sends
conversations and receives completions. `ActorEngine` is the `BatchEngine` protocol on the
driver's side: it starts `replicas` `JudgeWorker` actors, each of which builds its own
engine in its own process with the teacher's resources (one CPU for a CPU engine, so
two cores cannot deadlock; `gpus_per_replica` GPUs for a GPU engine), and spreads
batches of `batch_size` conversations over them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import ray
from pydantic import TypeAdapter

from radiag.teacher.backends import build_engine
from radiag.teacher.engines import (  # the teacher's resource rules: both stages reserve alike
    Completion,
    EngineConfig,
    Messages,
    SamplingConfig,
    actor_cpus,
    actor_env,
    actor_gpus,
)

_STOP_TIMEOUT_S = 60.0  # a graceful exit lets vLLM stop its engine process


class JudgeWorker:
    """A Ray actor that owns one judge engine, built in the actor's own process."""

    def __init__(self, engine: dict[str, Any]) -> None:
        # Only a validated config crosses the Ray boundary, and it is validated again here.
        self.engine = build_engine(TypeAdapter(EngineConfig).validate_python(engine))

    def identity(self) -> dict[str, Any]:
        """What provenance records (backend, model) and where the engine runs (node, pid)."""
        return {
            "backend": self.engine.backend,
            "model": self.engine.model,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }

    def generate(
        self,
        conversations: list[Messages],
        sampling: dict[str, Any],
        answer_prefix: str | None,
        answer_choices: list[str] | None,
    ) -> list[Completion]:
        return self.engine.generate(
            conversations, SamplingConfig.model_validate(sampling), answer_prefix, answer_choices
        )

    def stop(self) -> None:
        """Exit the actor's process gracefully (its exit handlers stop vLLM's engine core)."""
        ray.actor.exit_actor()


class ActorEngine:
    """The BatchEngine protocol in the driver, over engines that live in `JudgeWorker` actors.

    A context manager: leaving it stops the actors and frees their CPUs or GPUs.

    Attributes:
        backend, model: the engine's, as its actor reports them (provenance).
        processes: node_id and pid of every actor that holds an engine.
    """

    def __init__(self, cfg: EngineConfig) -> None:
        worker = ray.remote(JudgeWorker).options(
            num_cpus=actor_cpus(cfg), num_gpus=actor_gpus(cfg), runtime_env=actor_env(cfg)
        )
        self.batch_size = cfg.batch_size
        self.actors = [worker.remote(cfg.model_dump(mode="json")) for _ in range(cfg.replicas)]
        self.processes = ray.get([actor.identity.remote() for actor in self.actors])
        self.backend, self.model = self.processes[0]["backend"], self.processes[0]["model"]

    def generate(
        self,
        conversations: list[Messages],
        sampling: SamplingConfig,
        answer_prefix: str | None = None,
        answer_choices: Sequence[str] | None = None,
    ) -> list[Completion]:
        """One completion per conversation, in order; batches go to the actors in turn."""
        choices = list(answer_choices) if answer_choices is not None else None
        batches = [
            conversations[start : start + self.batch_size]
            for start in range(0, len(conversations), self.batch_size)
        ]
        pending = [
            self.actors[i % len(self.actors)].generate.remote(
                batch, sampling.model_dump(mode="json"), answer_prefix, choices
            )
            for i, batch in enumerate(batches)
        ]
        return [completion for done in ray.get(pending) for completion in done]

    def close(self) -> None:
        """Stop every actor: gracefully, else (after a timeout) by force."""
        stopping = [actor.stop.remote() for actor in self.actors]
        ray.wait(stopping, num_returns=len(stopping), timeout=_STOP_TIMEOUT_S)
        for actor in self.actors:
            ray.kill(actor)

    def __enter__(self) -> ActorEngine:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
