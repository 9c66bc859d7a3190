"""The MRI-only classifier (the modality arm's image alone): the 3-D encoder and a linear
head train on the labelled training visits' T1s and answer every test visit that has one,
without reading a test label; a T1 it cannot use becomes an error row, not a lost visit.

Trains for three steps on the shared split run's 16 imaged subjects (seconds): no other
fixture trains this model.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from radiag.errors import UserError
from radiag.mri_only import (
    MRI_ONLY_MODEL,
    WEIGHTS,
    MriOnlyClassifier,
    MriOnlyInputError,
    run_mri_only,
)
from radiag.outputs import PROBABILITY_COLUMNS, predictions_dir, read_parts
from radiag.store import RunStore
from radiag.students.config import MriOnlyConfig, OptimSettings
from radiag.students.volumes import VolumeConfig

SMALL = MriOnlyConfig(
    feature_dim=16,
    volumes=VolumeConfig(pixdim_mm=8.0, spatial_size=(32, 32, 32)),
    optim=OptimSettings(lr=1e-2, epochs=1, max_steps=3, batch_size=4),
)


def _rewrite(store: RunStore, path: str, change: dict[str, pa.Array]) -> None:
    table = store.read_table(path)
    for column, values in change.items():
        table = table.set_column(table.schema.get_field_index(column), column, values)
    store.write_table(path, table)


def test_it_trains_on_train_t1s_and_answers_every_imaged_test_visit_blind_to_its_label(
    fresh_run: RunStore, tmp_path
) -> None:
    test = fresh_run.read_table("splits/test.parquet")
    imaged = test.filter(pc.is_valid(test["mri_path"]))["patient_id"].to_pylist()
    broken, *usable = imaged
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a NIfTI file")
    paths = [str(corrupt) if pid == broken else p for pid, p in zip(
        test["patient_id"].to_pylist(), test["mri_path"].to_pylist(), strict=True
    )]  # fmt: skip
    _rewrite(
        fresh_run,
        "splits/test.parquet",
        {"mri_path": pa.array(paths), "label": pa.nulls(test.num_rows, pa.string())},
    )

    summary = run_mri_only(SMALL, fresh_run)

    rows = read_parts(fresh_run, predictions_dir(MRI_ONLY_MODEL)).to_pylist()
    assert sorted(r["patient_id"] for r in rows) == sorted(imaged)  # and no unimaged visit
    answered = {r["patient_id"]: r for r in rows if r["error"] is None}
    assert sorted(answered) == sorted(usable)
    for row in answered.values():
        probabilities = {label: row[column] for label, column in PROBABILITY_COLUMNS.items()}
        assert sum(probabilities.values()) == pytest.approx(1.0)
        assert row["diagnosis"] == max(probabilities, key=probabilities.__getitem__).value
    (failed,) = [r for r in rows if r["error"] is not None]
    assert failed["patient_id"] == broken and str(corrupt) in failed["error"]
    assert summary.counts["test_predicted"] == len(usable)
    assert summary.counts["train_volumes"] > 0 and len(summary.details["loss"]) == 1

    trained = torch.load(io.BytesIO(fresh_run.read_bytes(WEIGHTS)))
    torch.manual_seed(SMALL.seed)
    untrained = MriOnlyClassifier(SMALL).state_dict()
    assert trained.keys() == untrained.keys()
    assert not torch.equal(trained["head.weight"], untrained["head.weight"])


def test_without_a_labelled_training_t1_it_refuses_naming_the_split(fresh_run: RunStore) -> None:
    train = fresh_run.read_table("splits/train.parquet")
    _rewrite(fresh_run, "splits/train.parquet", {"mri_path": pa.nulls(train.num_rows, pa.string())})

    with pytest.raises(MriOnlyInputError, match=r"splits/train\.parquet has a usable T1") as error:
        run_mri_only(SMALL, fresh_run)
    assert isinstance(error.value, UserError)  # the CLI prints it as one line, exit code 2
