"""The stage contract: what every stage of a run promises, in one place.

A stage writes one output directory (plus, for the baselines, a few sibling
directories) and a record of what produced it, `<directory>/stage.json`. Its
*identity* is a fingerprint of everything its rows depend on:

- the stage config, without the fields that only schedule work (`replicas`,
  `batch_size`, `limit`, ...: each config class lists them in `scheduling_fields`);
- the output digest of every stage it reads, so a changed upstream changes every
  stage below it (a retrained student, rationales that grew);
- the content of files it reads from outside the run (source CSV, mapping YAML, a
  model directory);
- the versions of its prompts and templates.

`run_stage` applies the rules:

- no record: run, and record the identity before the first row is written;
- same identity, complete: skip (return the stored summary), except for a
  `resumable` stage (one row per patient: teacher, student diagnosis), whose body
  always runs and skips the rows already final itself, so a larger `limit` or rows
  that failed for a transient reason are picked up;
- same identity, not complete (killed): run again; the body resumes;
- other identity: refuse with `StageConflict`, naming what changed and what to do,
  unless `fresh`, which moves the old outputs to `superseded/<stage>-<identity>/`
  first. A table never holds rows of two identities.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, Field

from radiag.errors import UserError
from radiag.store import RunStore

RECORD = "stage.json"
SUPERSEDED = "superseded"


class StageSummary(BaseModel):
    """What a stage did: its identity and counts; stored in its record, printed by the CLI."""

    stage: str
    identity: str = ""
    counts: dict[str, int] = Field(default_factory=dict)
    details: dict[str, object] = Field(default_factory=dict)


class StageIdentity(BaseModel):
    """Everything a stage's output depends on; `fingerprint` names it."""

    stage: str
    config: dict[str, Any] = Field(default_factory=dict)
    upstream: dict[str, str] = Field(default_factory=dict)  # stage -> its output digest
    files: dict[str, str] = Field(default_factory=dict)  # outside file -> content digest
    versions: dict[str, str] = Field(default_factory=dict)  # prompt / template versions

    @property
    def fingerprint(self) -> str:
        return digest(self.model_dump(mode="json"))

    def changes_from(self, old: StageIdentity) -> list[str]:
        """Dotted paths of what differs from `old` (`config.sampling.seed`, `upstream.splits`)."""
        return _diff(old.model_dump(mode="json"), self.model_dump(mode="json"), "")


class StageRecord(BaseModel):
    """`<directory>/stage.json`: the identity that owns the directory and how far it got."""

    identity: StageIdentity
    fingerprint: str
    status: Literal["running", "complete"]
    output_digest: str | None = None  # set when complete: what stages below fingerprint
    summary: StageSummary | None = None


@dataclass(frozen=True)
class Stage:
    """A stage's name and where its outputs live (the record sits in `directory`)."""

    name: str
    directory: str
    also: tuple[str, ...] = ()  # further output directories, moved with it on `fresh`
    resumable: bool = False  # the body skips finished rows: it runs even when complete

    @property
    def record(self) -> str:
        return f"{self.directory}/{RECORD}"


class StageConflict(UserError, RuntimeError):
    """A stage's outputs were written by another identity; the message is user-facing."""


class StageNotReady(UserError, RuntimeError):
    """A stage reads an upstream stage that has not finished; the message is user-facing."""


def digest(payload: Any) -> str:
    """Short, stable hash of a JSON-able value."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_identity(model: BaseModel) -> dict[str, Any]:
    """A config as identity: its JSON dump without fields that only schedule work.

    A config class lists those in a `scheduling_fields` class attribute; nested
    configs are walked, so an engine's `replicas` is left out wherever it sits.
    """
    skipped: frozenset[str] = getattr(type(model), "scheduling_fields", frozenset())
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        if name in skipped:
            continue
        value = getattr(model, name)
        out[name] = _identity_value(value)
    return out


def _identity_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return config_identity(value)
    if isinstance(value, list | tuple):
        return [_identity_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _identity_value(v) for k, v in value.items()}
    return json.loads(json.dumps(value, default=str))


def read_record(store: RunStore, stage: Stage) -> StageRecord | None:
    if not store.exists(stage.record):
        return None
    return StageRecord.model_validate(store.read_json(stage.record))


def upstream_digest(store: RunStore, stage: Stage) -> str:
    """The output digest of a finished upstream stage, for the identity of a stage below it.

    Raises:
        StageNotReady: the upstream stage never finished in this run.
    """
    record = read_record(store, stage)
    if record is None or record.output_digest is None:
        raise StageNotReady(
            f"stage {stage.name} has not finished in {store.uri}: "
            f"run it first (`radiag run` runs every stage in order)"
        )
    return record.output_digest


def content_digest(stream: BinaryIO) -> str:
    """Digest of an outside file's bytes, read in chunks (a cohort export can be GBs);
    the identity's `files` key names the file."""
    sha = hashlib.sha256()
    while chunk := stream.read(1 << 20):
        sha.update(chunk)
    return sha.hexdigest()[:16]


def run_stage(
    store: RunStore,
    stage: Stage,
    identity: StageIdentity,
    body: Callable[[], StageSummary],
    fresh: bool = False,
) -> StageSummary:
    """Run `body` under the stage contract (see the module docstring) and record the result.

    Args:
        store: the run store.
        stage: the stage's name and output directories.
        identity: what the output depends on.
        body: does the work; resumes from the rows already in the output directory.
        fresh: move another identity's outputs aside instead of refusing.

    Raises:
        StageConflict: the outputs belong to another identity and `fresh` is False.
    """
    fingerprint = identity.fingerprint
    record = read_record(store, stage)
    if record is not None and record.fingerprint != fingerprint:
        if not fresh:
            raise StageConflict(_conflict_message(store, stage, identity, record))
        supersede(store, stage, record.fingerprint)
        record = None
    if record is not None and record.summary is not None and not stage.resumable:
        return record.summary  # complete: only a finished stage stores its summary
    store.write_json(
        stage.record,
        StageRecord(identity=identity, fingerprint=fingerprint, status="running").model_dump(),
    )
    summary = body().model_copy(update={"identity": fingerprint})
    done = StageRecord(
        identity=identity,
        fingerprint=fingerprint,
        status="complete",
        output_digest=digest([fingerprint, _listing(store, stage)]),
        summary=summary,
    )
    store.write_json(stage.record, done.model_dump())
    return summary


def supersede(store: RunStore, stage: Stage, fingerprint: str) -> None:
    """Move a stage's outputs to `superseded/<stage>-<fingerprint>/`."""
    target = f"{SUPERSEDED}/{stage.name}-{fingerprint}"
    for directory in (stage.directory, *stage.also):
        if store.exists(directory):
            store.move_dir(directory, posixpath.join(target, directory))


def _listing(store: RunStore, stage: Stage) -> list[tuple[str, int]]:
    """Names and sizes of the files a stage wrote (top level of each output directory)."""
    return [
        item
        for directory in (stage.directory, *stage.also)
        for item in store.file_sizes(directory)
        if not item[0].endswith(RECORD)
    ]


def _conflict_message(
    store: RunStore, stage: Stage, identity: StageIdentity, record: StageRecord
) -> str:
    changed = identity.changes_from(record.identity)
    shown = ", ".join(changed[:8]) + (f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")
    return (
        f"{store.uri_of(stage.directory)} was written by another {stage.name} identity "
        f"({record.fingerprint}; now {identity.fingerprint}); changed: {shown}. "
        "Use a new run_dir, or --fresh to move the old outputs to "
        f"{store.uri_of(SUPERSEDED)}/ and run this one" + _precision_hint(changed, identity, record)
    )


PRECISION_FIELDS = frozenset({"dtype", "precision"})  # resolved per machine (radiag.precision)


def _precision_hint(changed: list[str], identity: StageIdentity, record: StageRecord) -> str:
    """The remedy when only the machine differs: `dtype: auto` resolved to another precision
    here than where the run began (a CPU without native bf16, another GPU)."""
    for path in changed:
        if path.rsplit(".", 1)[-1] in PRECISION_FIELDS:
            old = _lookup(record.identity.model_dump(mode="json"), path)
            new = _lookup(identity.model_dump(mode="json"), path)
            field = path.removeprefix("config.")
            return (
                f". The precision differs ({field}: {old} in the run, {new} on this machine): "
                f"set {field}: {old} in this stage's config to continue the run in {old}"
            )
    return ""


def _lookup(tree: Any, path: str) -> Any:
    for key in path.split("."):
        tree = tree.get(key) if isinstance(tree, Mapping) else None
    return tree


def _diff(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        keys = sorted(set(old) | set(new))
        return [
            change
            for key in keys
            for change in _diff(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        ]
    return [] if old == new else [path or "<root>"]


def upstream(store: RunStore, stages: Iterable[Stage]) -> dict[str, str]:
    """`{name: output digest}` of the stages a stage reads, for its `StageIdentity`.

    Raises:
        StageNotReady: one of them has not finished.
    """
    return {stage.name: upstream_digest(store, stage) for stage in stages}


def finished_upstream(store: RunStore, stages: Iterable[Stage]) -> dict[str, str]:
    """Like `upstream`, for a stage that reads whatever of `stages` has finished."""
    records = {stage.name: read_record(store, stage) for stage in stages}
    return {name: r.output_digest for name, r in records.items() if r and r.output_digest}
