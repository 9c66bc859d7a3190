"""Column mappings: how a cohort CSV's columns become the canonical schema.

A user with another dataset writes one YAML (see configs/mappings/example.yaml)
instead of code, and instead of preprocessing the CSV outside the project. The
ADNIMERGE and AIBL readers use bundled mappings too.

Derived columns are small arithmetic expressions over the file's columns
(`brain_fraction * icv_cm3 * 1000`). They are parsed with `ast` and only numbers,
column names, `+ - * /`, unary minus and parentheses are allowed: a mapping is
data, never code, so nothing in it is ever passed to Python's `eval`.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from radiag.cohort.schema import COLUMN_BY_NAME, NUMERIC_COLUMNS, Label
from radiag.config import StrictModel, load_config

MAPPINGS_DIR = Path(__file__).with_name("mappings")
# Computed by validation itself, never read from a file.
COMPUTED_COLUMNS = ("patient_id", "source", "age_at_visit")

_BACKQUOTED = re.compile(r"`([^`]+)`")
_OPERATORS: dict[type[ast.AST], Callable[..., object]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load,
                  *_OPERATORS)  # fmt: skip


class Expression:
    """An arithmetic expression over named columns, checked when it is parsed.

    Column names that are not Python identifiers go in backquotes:
    `` `Left-Hippocampus` + `Right-Hippocampus` ``.

    Raises:
        ValueError: the text is not an expression, or uses anything but numbers,
            column names, + - * /, unary minus and parentheses.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        quoted: dict[str, str] = {}

        def alias(match: re.Match[str]) -> str:
            quoted[f"_column{len(quoted)}"] = match.group(1)
            return f"_column{len(quoted) - 1}"

        try:
            self._tree = ast.parse(_BACKQUOTED.sub(alias, text).strip(), mode="eval")
        except SyntaxError:
            raise ValueError(f"{text!r} is not an arithmetic expression") from None
        self.names: set[str] = set()
        for node in ast.walk(self._tree):
            if not isinstance(node, _ALLOWED_NODES):
                raise ValueError(
                    f"{text!r}: {type(node).__name__} is not allowed "
                    "(only numbers, column names, + - * / and parentheses)"
                )
            if isinstance(node, ast.Constant) and type(node.value) not in (int, float):
                raise ValueError(f"{text!r}: {node.value!r} is not a number")
            if isinstance(node, ast.Name):
                node.id = quoted.get(node.id, node.id)
                self.names.add(node.id)

    def evaluate(self, columns: dict[str, pd.Series]) -> pd.Series | float:
        """The value over `columns` (name -> numbers); a scalar if the expression names none.

        Raises:
            KeyError: a name missing from `columns` (check `names` first for a clear message).
        """
        return self._node(self._tree.body, columns)

    def _node(self, node: ast.AST, columns: dict[str, pd.Series]) -> pd.Series | float:
        if isinstance(node, ast.Constant):
            return np.float64(node.value)  # so that 1 / 0 is inf, as it is over a column
        if isinstance(node, ast.Name):
            return columns[node.id]
        if isinstance(node, ast.UnaryOp):
            return _OPERATORS[type(node.op)](self._node(node.operand, columns))
        assert isinstance(node, ast.BinOp)  # the only other node __init__ lets through
        left, right = self._node(node.left, columns), self._node(node.right, columns)
        return _OPERATORS[type(node.op)](left, right)


class LabelMap(StrictModel):
    """The label comes from one raw column: exact values, then numeric thresholds.

    Values matched by neither are unlabeled (the visit is kept). Keys may be text
    (`"1": CN`, matched as written) or numbers (`0.5: MCI`, matched as numbers, so
    "0.50" matches too); unquoted YAML numbers are numbers.
    """

    column: str = Field(description="raw column holding the diagnosis or rating")
    map: dict[str | float, Label] = Field(
        default_factory=dict, description="raw value -> CN / MCI / AD"
    )
    at_least: dict[float, Label] = Field(
        default_factory=dict,
        description="lower bound -> label, for a rating: {1: AD} = every value >= 1 is AD "
        "(the highest bound reached wins; `map` is tried first)",
    )

    @model_validator(mode="after")
    def _maps_something(self) -> LabelMap:
        if not self.map and not self.at_least:
            raise ValueError("labels needs `map` or `at_least` (or both)")
        return self


class VisitFrom(StrictModel):
    """The visit code is a part of another column (a session name such as `MR2_T1`)."""

    column: str = Field(description="raw column the visit code is taken from")
    pattern: str = Field(
        description="regular expression searched in that column; its group (or the whole "
        "match) is the visit code; a value it does not match is quarantined"
    )

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, pattern: str) -> str:
        try:
            groups = re.compile(pattern).groups
        except re.error as err:
            raise ValueError(f"not a regular expression: {err}") from None
        if groups > 1:
            raise ValueError("the pattern may have one group (the visit code), not more")
        return pattern


class ColumnMapping(StrictModel):
    """How one cohort file maps onto the canonical schema."""

    source: str = Field(
        pattern=r"^[a-z0-9_]+$", description="cohort name, part of every patient_id"
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="raw column -> canonical column; unlisted canonical names pass through; "
        "a column mapped to `label` holds CN / MCI / AD (any case)",
    )
    subject_ids: Literal["integer", "text"] = Field(
        "integer",
        description="'text' for ids like ABC_0001: patient_id and PTID keep the id as written, "
        "RID numbers the subjects in the id's sort order",
    )
    visit: str | VisitFrom | None = Field(
        None,
        description="a visit code for every row (a file of baseline visits: bl), or where in "
        "another column to find it; instead of a VISCODE column",
    )
    derived: dict[str, str] = Field(
        default_factory=dict,
        description="canonical numeric column -> expression over the file's columns, in "
        "canonical units (`units` does not apply)",
    )
    values: dict[str, dict[str | float, str | float | None]] = Field(
        default_factory=dict,
        description="canonical column -> {raw value: canonical value}; numeric columns get "
        "numbers, '' or null means not recorded; applied before `units`",
    )
    units: dict[str, float] = Field(
        default_factory=dict,
        description="canonical column -> factor to canonical units (cm^3 -> mm^3: 1000)",
    )
    missing: list[str] = Field(
        default_factory=lambda: ["", "NA", "N/A", "nan", "-4", "-1"],
        description="raw tokens meaning 'not recorded' (ADNI/AIBL use -4 and -1)",
    )
    labels: Literal["adni"] | LabelMap = Field(
        "adni", description="'adni' = DX per visit, else DX_bl at baseline; or a LabelMap"
    )
    age_at: Literal["baseline", "visit"] = Field(
        "baseline", description="whether AGE is the age at baseline (ADNIMERGE) or at the visit"
    )
    ranges: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="canonical numeric column -> [low, high] replacing the schema's plausible "
        "range; AGE's low bound is also age_at_visit's unless that is given",
    )
    delimiter: str | None = Field(
        None, min_length=1, max_length=1, description="CSV delimiter; default: detected"
    )

    @field_validator("derived")
    @classmethod
    def _expressions_parse(cls, derived: dict[str, str]) -> dict[str, str]:
        for text in derived.values():
            Expression(text)
        return derived

    @model_validator(mode="after")
    def _targets_are_canonical(self) -> ColumnMapping:
        targets = list(self.columns.values())
        inputs = set(COLUMN_BY_NAME) - set(COMPUTED_COLUMNS)
        unknown = {c for c in (*targets, *self.values) if c not in inputs}
        if unknown:
            raise ValueError(f"not canonical columns read from a file: {sorted(unknown)}")
        numeric = {*self.units, *self.derived} - inputs.intersection(NUMERIC_COLUMNS)
        numeric |= {c for c in self.ranges if c not in NUMERIC_COLUMNS}
        if numeric:
            raise ValueError(f"not numeric canonical columns: {sorted(numeric)}")
        twice = sorted(
            {t for t in targets if targets.count(t) > 1} | (set(targets) & set(self.derived))
        )
        if twice:
            raise ValueError(f"more than one source for {twice} (columns/derived)")
        if isinstance(self.visit, str) and not self.visit.strip():
            raise ValueError("visit: an empty visit code")
        if self.visit is not None and "VISCODE" in targets:
            raise ValueError("the visit code comes from `visit` or a VISCODE column, not both")
        if "label" in targets and "labels" in self.model_fields_set:
            raise ValueError("the label comes from `columns: {X: label}` or `labels`, not both")
        if "label" in self.values and "label" not in targets:
            raise ValueError("`values: {label: ...}` recodes a column mapped to label")
        if set(self.values) & set(self.derived):
            raise ValueError("a derived column is computed, not recoded: drop it from `values`")
        for column, recode in self.values.items():
            self._check_recode(column, recode)
        for column, (low, high) in self.ranges.items():
            if low > high:
                raise ValueError(f"ranges.{column}: low {low:g} is above high {high:g}")
        return self

    @staticmethod
    def _check_recode(column: str, recode: dict[str | float, str | float | None]) -> None:
        numeric = column in NUMERIC_COLUMNS
        wrong = [
            v for v in recode.values() if v not in (None, "") and isinstance(v, str) == numeric
        ]
        if wrong:
            kind = "numbers" if numeric else "text"
            raise ValueError(f"values.{column}: recodes to {kind}, got {wrong}")

    @property
    def label_column(self) -> bool:
        """Whether a raw column mapped to `label` holds the labels (then `labels` is unused)."""
        return "label" in self.columns.values()

    def required_columns(self) -> list[str]:
        """Raw columns the file must have: subject, visit (unless `visit` supplies it), label."""
        canonical = ["RID"] if self.visit is not None else ["RID", "VISCODE"]
        if self.label_column:
            canonical.append("label")
        elif isinstance(self.labels, LabelMap):
            canonical.append(self.labels.column)  # a canonical column or one of the file's
        raw_of = {target: raw for raw, target in self.columns.items()}
        needed = [raw_of.get(name, name) for name in canonical]
        if isinstance(self.visit, VisitFrom):
            needed.append(self.visit.column)
        return needed

    def bounds(self, column: str) -> tuple[float, float] | None:
        """The plausible range a value of `column` is checked against (None: not checked)."""
        if column in self.ranges:
            return self.ranges[column]
        schema = COLUMN_BY_NAME[column]
        if schema.low is None or schema.high is None:
            return None
        if column == "age_at_visit" and "AGE" in self.ranges:
            # age at a visit is never below age at baseline: a younger cohort's AGE bound
            # must not quarantine its own follow-up visits
            return min(schema.low, self.ranges["AGE"][0]), schema.high
        return schema.low, schema.high


def load_mapping(path: str | Path) -> ColumnMapping:
    return load_config(ColumnMapping, path)


def bundled_mapping(name: Literal["adnimerge", "aibl"]) -> ColumnMapping:
    return load_mapping(MAPPINGS_DIR / f"{name}.yaml")
