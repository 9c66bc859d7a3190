"""The stage contract: skip, resume, refuse or supersede, decided by a stage's identity."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from radiag.contract import (
    Stage,
    StageConflict,
    StageIdentity,
    StageNotReady,
    StageSummary,
    config_identity,
    read_record,
    run_stage,
    upstream,
)
from radiag.store import RunStore
from radiag.teacher.engines import OpenAIEngineConfig, SamplingConfig, VllmEngineConfig
from radiag.teacher.stages import RationalizeConfig

STAGE = Stage("teach", "out", also=("extra",))
ROWS_STAGE = Stage("rows", "rows", resumable=True)
UPSTREAM = Stage("up", "up", resumable=True)
DOWNSTREAM = Stage("down", "down")


def identity(seed: int = 0, temperature: float = 0.0, stage: str = "teach") -> StageIdentity:
    return StageIdentity(
        stage=stage, config={"sampling": {"seed": seed, "temperature": temperature}}
    )


class Body:
    """A stage body that writes one file per call into each output directory and counts calls;
    with `writes=False` it finds nothing left to do (a resumable stage already complete)."""

    def __init__(self, store: RunStore, stage: Stage = STAGE) -> None:
        self.store = store
        self.stage = stage
        self.writes = True
        self.calls = 0

    def __call__(self) -> StageSummary:
        self.calls += 1
        if self.writes:
            for directory in (self.stage.directory, *self.stage.also):
                self.store.write_bytes(f"{directory}/call-{self.calls}.txt", b"rows")
        return StageSummary(stage=self.stage.name, counts={"calls": self.calls})


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(str(tmp_path / "run"))


def test_the_same_identity_once_complete_is_skipped_with_its_stored_summary(
    store: RunStore,
) -> None:
    body = Body(store)
    first = run_stage(store, STAGE, identity(), body)
    again = run_stage(store, STAGE, identity(), body)
    assert body.calls == 1
    assert again == first and again.identity == identity().fingerprint
    record = read_record(store, STAGE)
    assert record is not None and record.status == "complete" and record.output_digest


def test_the_identity_is_recorded_as_running_before_the_body_writes(store: RunStore) -> None:
    def body() -> StageSummary:
        record = read_record(store, STAGE)
        assert record is not None and record.status == "running"
        assert record.fingerprint == identity().fingerprint
        return StageSummary(stage="teach")

    run_stage(store, STAGE, identity(), body)


def test_a_resumable_stage_runs_its_body_again_when_complete(store: RunStore) -> None:
    """Row stages pick up a larger limit or transient failures; their body skips final rows."""
    body = Body(store, ROWS_STAGE)
    run_stage(store, ROWS_STAGE, identity(), body)
    summary = run_stage(store, ROWS_STAGE, identity(), body)
    assert body.calls == 2 and summary.counts["calls"] == 2
    assert read_record(store, ROWS_STAGE).summary == summary


def test_a_resumable_stage_that_wrote_nothing_new_keeps_its_output_digest(
    store: RunStore,
) -> None:
    body = Body(store, ROWS_STAGE)
    run_stage(store, ROWS_STAGE, identity(), body)
    before = read_record(store, ROWS_STAGE).output_digest
    body.writes = False
    run_stage(store, ROWS_STAGE, identity(), body)
    assert read_record(store, ROWS_STAGE).output_digest == before


def test_a_killed_stage_runs_again_with_the_same_identity(store: RunStore) -> None:
    def killed() -> StageSummary:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(store, STAGE, identity(), killed)
    body = Body(store)
    run_stage(store, STAGE, identity(), body)
    assert body.calls == 1


def test_another_identity_is_refused_naming_what_changed_and_the_way_out(
    store: RunStore,
) -> None:
    run_stage(store, STAGE, identity(), Body(store))
    body = Body(store)
    with pytest.raises(StageConflict) as refused:
        run_stage(store, STAGE, identity(seed=1), body)
    message = str(refused.value)
    assert "changed: config.sampling.seed." in message  # only what changed, dotted
    assert "--fresh" in message and store.uri_of("out") in message
    assert identity().fingerprint in message and identity(seed=1).fingerprint in message
    assert body.calls == 0
    assert store.list_files("out", suffix=".txt") == ["out/call-1.txt"]


def test_fresh_moves_every_old_output_directory_aside_and_the_new_identity_owns_them(
    store: RunStore,
) -> None:
    old = identity()
    run_stage(store, STAGE, old, Body(store))
    body = Body(store)
    run_stage(store, STAGE, identity(seed=1), body, fresh=True)
    aside = f"superseded/teach-{old.fingerprint}"
    assert store.list_files(f"{aside}/out") == [
        f"{aside}/out/call-1.txt",
        f"{aside}/out/stage.json",
    ]
    assert store.list_files(f"{aside}/extra") == [f"{aside}/extra/call-1.txt"]
    assert store.read_json(f"{aside}/out/stage.json")["fingerprint"] == old.fingerprint
    # The new body started from empty directories: its file is the only one there.
    assert store.list_files("out", suffix=".txt") == ["out/call-1.txt"]
    assert store.list_files("extra") == ["extra/call-1.txt"]
    record = read_record(store, STAGE)
    assert record is not None and record.fingerprint == identity(seed=1).fingerprint
    assert body.calls == 1


def test_fresh_with_the_same_identity_moves_nothing(store: RunStore) -> None:
    run_stage(store, STAGE, identity(), Body(store))
    run_stage(store, STAGE, identity(), Body(store), fresh=True)
    assert not store.exists("superseded")


def test_fresh_moves_the_old_outputs_on_s3(s3_endpoint: str) -> None:
    store = RunStore(f"s3://radiag/contract-{uuid.uuid4().hex[:8]}/run")
    old = identity()
    run_stage(store, STAGE, old, Body(store))
    run_stage(store, STAGE, identity(seed=1), Body(store), fresh=True)
    aside = f"superseded/teach-{old.fingerprint}"
    assert store.list_files(f"{aside}/out") == [
        f"{aside}/out/call-1.txt",
        f"{aside}/out/stage.json",
    ]
    assert store.list_files(f"{aside}/extra") == [f"{aside}/extra/call-1.txt"]
    assert store.list_files("out") == ["out/call-1.txt", "out/stage.json"]
    record = read_record(store, STAGE)
    assert record is not None and record.fingerprint == identity(seed=1).fingerprint


def rationalize(**changes: object) -> RationalizeConfig:
    engine = OpenAIEngineConfig(base_url="http://127.0.0.1:9/v1", model="teacher")
    return RationalizeConfig(engine=engine).model_copy(update=changes)


def fingerprint(cfg: RationalizeConfig) -> str:
    return StageIdentity(stage="rationalize", config=config_identity(cfg)).fingerprint


def test_scheduling_fields_are_left_out_of_the_identity() -> None:
    base = rationalize()
    rescheduled = rationalize(
        limit=50,
        engine=base.engine.model_copy(update={"replicas": 4, "batch_size": 2, "timeout_s": 9.0}),
    )
    assert fingerprint(rescheduled) == fingerprint(base)
    assert "limit" not in config_identity(base)
    assert "replicas" not in config_identity(base)["engine"]
    vllm = VllmEngineConfig()
    assert config_identity(vllm) == config_identity(vllm.model_copy(update={"replicas": 8}))


@pytest.mark.parametrize(
    ("changed", "path"),
    [
        ({"sampling": SamplingConfig(seed=1)}, "config.sampling.seed"),
        ({"sampling": SamplingConfig(temperature=0.7)}, "config.sampling.temperature"),
        ({"regeneration_attempts": 3}, "config.regeneration_attempts"),
    ],
)
def test_what_a_row_depends_on_changes_the_identity(changed: dict[str, object], path: str) -> None:
    base, other = rationalize(), rationalize(**changed)
    assert fingerprint(other) != fingerprint(base)
    new = StageIdentity(stage="rationalize", config=config_identity(other))
    old = StageIdentity(stage="rationalize", config=config_identity(base))
    assert new.changes_from(old) == [path]


def test_an_upstream_that_never_ran_is_not_ready(store: RunStore) -> None:
    with pytest.raises(StageNotReady, match="stage up has not finished"):
        upstream(store, [UPSTREAM])


def test_an_upstream_that_was_killed_is_not_ready(store: RunStore) -> None:
    def killed() -> StageSummary:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(store, UPSTREAM, identity(stage="up"), killed)
    with pytest.raises(StageNotReady, match="stage up has not finished"):
        upstream(store, [UPSTREAM])


def downstream_identity(store: RunStore) -> StageIdentity:
    return StageIdentity(stage="down", upstream=upstream(store, [UPSTREAM]))


def test_a_changed_upstream_output_changes_the_downstream_identity(store: RunStore) -> None:
    """The upstream keeps its identity but writes more (a retried row): what it wrote changed."""
    up = Body(store, UPSTREAM)
    run_stage(store, UPSTREAM, identity(stage="up"), up)
    before = downstream_identity(store)
    run_stage(store, DOWNSTREAM, before, Body(store, DOWNSTREAM))
    run_stage(store, UPSTREAM, identity(stage="up"), up)
    after = downstream_identity(store)
    assert after.fingerprint != before.fingerprint
    with pytest.raises(StageConflict, match=r"changed: upstream\.up\."):
        run_stage(store, DOWNSTREAM, after, Body(store, DOWNSTREAM))


def test_an_unchanged_upstream_keeps_the_downstream_identity(store: RunStore) -> None:
    up = Body(store, UPSTREAM)
    run_stage(store, UPSTREAM, identity(stage="up"), up)
    before = downstream_identity(store)
    up.writes = False
    run_stage(store, UPSTREAM, identity(stage="up"), up)
    assert downstream_identity(store) == before
