"""Loading stage configs: YAML file -> `--set a.b=c` overrides -> pydantic validation.

Every CLI command and job entrypoint goes through `load_config`, so a bad field is
reported the same way everywhere: one line per problem, naming the field path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from radiag.errors import UserError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors (a typo must not be ignored).

    `scheduling_fields` names the fields that change how fast a stage runs, not what
    it writes (`replicas`, `batch_size`, `limit`); the stage identity leaves them out
    (`radiag.contract.config_identity`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    scheduling_fields: ClassVar[frozenset[str]] = frozenset()


class ConfigError(UserError, ValueError):
    """A config file that cannot be read or does not validate; the message is user-facing."""


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (`1`, `true`, `[a, b]`)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key.path=value")
    dotted, raw_value = assignment.split("=", 1)
    *parents, leaf = dotted.strip().split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {key!r} is not a section")
        node = child
    node[leaf] = yaml.safe_load(raw_value)


_UNION_MEMBER = re.compile(r"^(literal|function-(after|before|wrap|plain))\[")


def field_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the dotted path a user writes, without the names
    pydantic gives the members of a union (`labels.map.HC`, not
    `labels.function-after[_maps_something(), LabelMap].map.HC`)."""
    parts = [str(p) for p in loc if not _UNION_MEMBER.match(str(p))]
    return ".".join(parts) or "<root>"


def load_config(
    model: type[ConfigT],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> ConfigT:
    """Read a YAML config (optional; else start from `base`), apply overrides, validate.

    Raises:
        ConfigError: the file is missing or not YAML, or a field is invalid; the
            message names the file and every bad field by its dotted path.
    """
    tree: dict[str, Any] = dict(base or {})
    origin = "command line"
    if path is not None:
        origin = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
    for assignment in overrides or []:
        apply_override(tree, assignment)
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        problems = [f"  {field_path(e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{origin}: invalid config\n" + "\n".join(problems)) from None
