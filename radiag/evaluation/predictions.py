"""Every model's test-split predictions, read and checked before anything is scored.

A run directory holds the test split (`splits/test.parquet`) and one folder per model
under `predictions/<model>/` (teacher, student-text, student-vlm,
baseline-<classifier>-<features>), all written in `radiag.outputs.OUTPUT_SCHEMA`. A
table that cannot be scored honestly (an unknown label, a patient predicted twice, a
patient from another split) is refused with a message that names its file(s) and the
offending rows; one bad model never stops the others from being evaluated.
"""

from __future__ import annotations

import posixpath

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from radiag.cohort.schema import Label
from radiag.errors import UserError
from radiag.outputs import OUTPUT_SCHEMA, PROBABILITY_COLUMNS, predictions_dir
from radiag.store import RunStore

TEST_SPLIT = "splits/test.parquet"
PREDICTIONS = "predictions"
REQUIRED_COLUMNS = ("patient_id", "diagnosis", "error", "parse_error")
"""A part file must have these; any other OUTPUT_SCHEMA column (probabilities too) may be absent."""
LABELS = tuple(str(label) for label in Label)
EXAMPLES = 5  # offending rows quoted in a message; the count covers the rest
_SOURCE = "_source"  # per-row part file URI, kept while checking so messages can name files


class EvaluationInputError(UserError, RuntimeError):
    """A split or prediction table that cannot be evaluated; the message names the file and rows."""


def test_labels(store: RunStore) -> pd.Series:
    """patient_id -> label (AD / MCI / CN) of the labelled rows of the test split.

    Unlabelled test rows (null label) are left out: they can be predicted, not scored.

    Raises:
        EvaluationInputError: the split is missing, lacks patient_id or label, repeats a
            patient_id, or has a label outside AD/MCI/CN.
    """
    split = _test_split(store)
    labelled = split[split["label"].notna()]
    return pd.Series(
        labelled["label"].to_numpy(),
        index=pd.Index(labelled["patient_id"].to_numpy(), name="patient_id"),
        name="label",
    )


test_labels.__test__ = False  # a `test_` name: keep pytest from collecting it where it is imported


def model_names(store: RunStore) -> list[str]:
    """The folders under `predictions/` that hold at least one part file, sorted."""
    selector = pafs.FileSelector(store.path(PREDICTIONS), allow_not_found=True)
    folders = [
        posixpath.basename(info.path.rstrip("/"))
        for info in store.fs.get_file_info(selector)
        if info.type == pafs.FileType.Directory
    ]
    return sorted(name for name in folders if _part_files(store, predictions_dir(name)))


def load_model(store: RunStore, name: str, test_ids: set[str]) -> pd.DataFrame:
    """One model's predictions: every OUTPUT_SCHEMA column, one row per patient, by patient_id.

    Each part file is read on its own, so a problem names the file it is in. A part must
    have the REQUIRED_COLUMNS (a missing probability or provenance column becomes null).
    Its rows must have a diagnosis in AD/MCI/CN or null (= unparsed), probabilities in
    [0, 1] or null, a patient_id found in `test_ids` (every test-split patient, labelled
    or not), and no patient_id twice across the parts.

    Raises:
        EvaluationInputError: listing every problem found, each with its file(s), the
            number of offending rows and the first few patient_ids and values.
    """
    directory = predictions_dir(name)
    parts = _part_files(store, directory)
    if not parts:
        raise EvaluationInputError(f"{store.uri_of(directory)} holds no prediction part files")
    frames, problems = [], []
    for part in parts:
        try:
            frames.append(_read_part(store, part))
        except EvaluationInputError as err:
            problems.append(str(err))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if frames:
        frame = _without_retried_failures(frame)
        problems += _row_problems(frame, test_ids, store.uri_of(TEST_SPLIT))
    if problems:
        raise EvaluationInputError(
            f"predictions of {name!r} in {store.uri_of(directory)} cannot be evaluated: "
            + "; ".join(problems)
        )
    return frame.drop(columns=_SOURCE).sort_values("patient_id", ignore_index=True)


def load_predictions(store: RunStore) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Every model under `predictions/` that loads, by name, and the problems of those that don't.

    Raises:
        EvaluationInputError: only for the test split itself, without which nothing is scored.
    """
    test_ids = set(_test_split(store)["patient_id"])
    models: dict[str, pd.DataFrame] = {}
    problems: list[str] = []
    for name in model_names(store):
        try:
            models[name] = load_model(store, name, test_ids)
        except EvaluationInputError as err:
            problems.append(str(err))
    return models, problems


def _part_files(store: RunStore, directory: str) -> list[str]:
    # The same listing as radiag.outputs.read_parts: what a stage resumes from is what is scored.
    return store.list_files(directory, suffix=".parquet")


def _test_split(store: RunStore) -> pd.DataFrame:
    """patient_id and label of every test-split row, checked."""
    uri = store.uri_of(TEST_SPLIT)
    if not store.exists(TEST_SPLIT):
        raise EvaluationInputError(f"{uri} not found: run `radiag cohort split` first")
    table = store.read_table(TEST_SPLIT)
    missing = [c for c in ("patient_id", "label") if c not in table.column_names]
    if missing:
        raise EvaluationInputError(f"{uri} lacks the column(s) {', '.join(missing)}")
    split = table.select(["patient_id", "label"]).to_pandas()
    unknown = split[split["label"].notna() & ~split["label"].isin(LABELS)]
    if len(unknown):
        raise EvaluationInputError(
            f"{uri}: label outside {'/'.join(LABELS)} in {_rows(unknown, 'label')}"
        )
    repeated = split[split["patient_id"].duplicated(keep=False)]
    if len(repeated):
        raise EvaluationInputError(f"{uri}: patient_id repeated in {_rows(repeated)}")
    return split


def _read_part(store: RunStore, part: str) -> pd.DataFrame:
    """One part file in OUTPUT_SCHEMA (absent optional columns null), plus its URI per row."""
    uri = store.uri_of(part)
    try:
        table = store.read_table(part)
    except (OSError, pa.ArrowException) as err:
        raise EvaluationInputError(f"{uri} is not a readable Parquet file ({err})") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise EvaluationInputError(
            f"{uri} lacks the column(s) {', '.join(missing)} of radiag.outputs.OUTPUT_SCHEMA"
        )
    columns = []
    for field in OUTPUT_SCHEMA:
        if field.name not in table.column_names:
            columns.append(pa.chunked_array([pa.nulls(table.num_rows, field.type)]))
            continue
        try:
            columns.append(table[field.name].cast(field.type))
        except pa.ArrowException as err:
            found = table.schema.field(field.name).type
            raise EvaluationInputError(
                f"{uri}: column {field.name} is {found}, expected {field.type} ({err})"
            ) from err
    frame = pa.Table.from_arrays(columns, schema=OUTPUT_SCHEMA).to_pandas()
    frame[_SOURCE] = uri
    return frame


def _without_retried_failures(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop transient failures that a later row of the same patient replaced (a retry), as
    `radiag.outputs.read_parts` does; any other repeated patient_id stays a problem."""
    ordered = frame.sort_values("created_at", kind="stable", na_position="first")
    transient = ordered["transient"].fillna(False).astype(bool)
    replaced = ordered["patient_id"].duplicated(keep="last")  # a newer row of the patient exists
    return ordered[~(transient & replaced)]


def _row_problems(frame: pd.DataFrame, test_ids: set[str], split_uri: str) -> list[str]:
    """One message per broken rule, each naming the part files and rows that break it."""
    problems = []
    diagnosis = frame["diagnosis"]
    unknown = frame[diagnosis.notna() & ~diagnosis.isin(LABELS)]
    if len(unknown):
        problems.append(
            f"{_files(unknown)}: diagnosis outside {'/'.join(LABELS)} (null = unparsed) "
            f"in {_rows(unknown, 'diagnosis')}"
        )
    for column in PROBABILITY_COLUMNS.values():
        p = frame[column]
        outside = frame[p.notna() & ((p < 0) | (p > 1))]
        if len(outside):
            problems.append(
                f"{_files(outside)}: {column} outside [0, 1] in {_rows(outside, column)}"
            )
    repeated = frame[frame["patient_id"].duplicated(keep=False)]
    if len(repeated):
        problems.append(f"{_files(repeated)}: patient_id predicted twice in {_rows(repeated)}")
    foreign = frame[~frame["patient_id"].isin(test_ids)]
    if len(foreign):
        problems.append(
            f"{_files(foreign)}: patient_id not in {split_uri} in {_rows(foreign)} "
            "(predictions of another cohort or split)"
        )
    return problems


def _files(rows: pd.DataFrame) -> str:
    return ", ".join(sorted(rows[_SOURCE].unique()))


def _rows(rows: pd.DataFrame, column: str | None = None) -> str:
    """'3 rows (P1: 'Dementia', P2: 'x', and 1 more)': the count and the first few examples."""
    shown = rows.head(EXAMPLES)
    if column is None:
        examples = [str(pid) for pid in shown["patient_id"]]
    else:
        examples = [
            f"{pid}: {value!r}" if isinstance(value, str) else f"{pid}: {value}"
            for pid, value in zip(shown["patient_id"], shown[column], strict=True)
        ]
    if len(rows) > len(shown):
        examples.append(f"and {len(rows) - len(shown)} more")
    return f"{len(rows)} row{'s' if len(rows) != 1 else ''} ({', '.join(examples)})"
