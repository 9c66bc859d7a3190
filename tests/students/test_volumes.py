"""MRI preprocessing for the MRI+text student: fixed-size normalised tensors, cached per config,
with unusable files failing their own row only."""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pydantic
import pytest

from radiag.cohort.mri import encode_nifti_gz, synthesize_t1
from radiag.store import RunStore
from radiag.students.volumes import (
    VolumeConfig,
    load_volume,
    prepare_volumes,
    volume_transform,
)


@pytest.fixture(scope="module")
def t1() -> nib.Nifti1Image:
    """A synthetic T1 on the 2 mm MNI-like grid (99, 117, 95), RAS, noise everywhere."""
    return synthesize_t1(7_400.0, 32_000.0, 1_500_000.0, np.random.default_rng(0)).image


def random_1mm_image() -> nib.Nifti1Image:
    """Positive random voxels, 1 x 1 x 1.2 mm, voxel axes pointing (posterior, inferior, left)."""
    voxels = np.random.default_rng(1).uniform(1.0, 2.0, (110, 90, 80)).astype(np.float32)
    affine = np.array(
        [[0.0, 0.0, -1.2, 50.0], [-1.0, 0.0, 0.0, 60.0], [0.0, -1.0, 0.0, 40.0], [0, 0, 0, 1]]
    )
    return nib.Nifti1Image(voxels, affine)


def upsampled_to_1mm(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """The same head with every voxel split in 2 x 2 x 2: half the voxel size, same extent."""
    voxels = image.get_fdata(dtype=np.float32)
    for axis in range(3):
        voxels = np.repeat(voxels, 2, axis=axis)
    half = np.array([[0.5, 0, 0, -0.25], [0, 0.5, 0, -0.25], [0, 0, 0.5, -0.25], [0, 0, 0, 1]])
    return nib.Nifti1Image(voxels, image.affine @ half)


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("source", ["synthetic_2mm", "random_1mm_other_orientation"])
def test_any_image_becomes_float32_channel_first_of_spatial_size_z_scored_over_nonzero(
    source: str, t1: nib.Nifti1Image
) -> None:
    image = t1 if source == "synthetic_2mm" else random_1mm_image()

    volume = volume_transform(VolumeConfig())(image)

    assert volume.shape == (1, 96, 96, 96)
    assert volume.dtype == np.float32
    head = volume[volume != 0]
    assert head.mean() == pytest.approx(0.0, abs=1e-3)
    assert head.std() == pytest.approx(1.0, abs=1e-3)


def test_padding_outside_a_small_field_of_view_stays_zero() -> None:
    # 132 x 110 x 90 mm resampled to 2 mm is 66 x 55 x 45 voxels, centred in 96^3.
    volume = volume_transform(VolumeConfig())(random_1mm_image())[0]  # (D, H, W)

    assert (volume[:10] == 0).all() and (volume[-10:] == 0).all()
    assert (volume[40:56, 40:56, 40:56] != 0).all()


def test_the_same_head_stored_in_another_orientation_gives_the_same_tensor(
    t1: nib.Nifti1Image,
) -> None:
    to_pil = nib.orientations.ornt_transform(
        nib.io_orientation(t1.affine), nib.orientations.axcodes2ornt(("P", "I", "L"))
    )
    reoriented = t1.as_reoriented(to_pil)
    assert nib.aff2axcodes(reoriented.affine) == ("P", "I", "L")
    transform = volume_transform(VolumeConfig())

    np.testing.assert_allclose(transform(reoriented), transform(t1), atol=1e-5)


def test_a_1mm_copy_of_a_head_lands_on_the_same_2mm_grid(t1: nib.Nifti1Image) -> None:
    transform = volume_transform(VolumeConfig())

    original, copy = transform(t1).ravel(), transform(upsampled_to_1mm(t1)).ravel()

    # Only interpolation differs (a wrong voxel size would scale the head and drop this
    # well below 0.95; another subject's head scores about 0.94).
    assert np.corrcoef(original, copy)[0, 1] > 0.97


def test_config_sets_the_output_grid_and_rejects_bad_values(t1: nib.Nifti1Image) -> None:
    volume = volume_transform(VolumeConfig(pixdim_mm=4.0, spatial_size=(32, 40, 48)))(t1)
    assert volume.shape == (1, 32, 40, 48)

    bad_fields = [
        {"pixdim_mm": 0},
        {"spatial_size": (96, 0, 96)},
        {"orientation": "RAR"},
        {"orientation": "RASL"},
        {"pixdim": 2.0},  # a typo
    ]
    for bad in bad_fields:
        with pytest.raises(pydantic.ValidationError):
            VolumeConfig(**bad)
    assert VolumeConfig(orientation="PIL").orientation == "PIL"


@pytest.fixture
def mri_rows(tmp_path: Path, t1: nib.Nifti1Image) -> pa.Table:
    """Two usable MRIs, then every way a row can fail."""
    good_gz = encode_nifti_gz(t1)
    flat = nib.Nifti1Image(np.ones((20, 20), np.float32), np.eye(4))
    paths = {
        "p:good": write(tmp_path / "good.nii.gz", good_gz),
        "p:other": write(tmp_path / "other.nii.gz", encode_nifti_gz(random_1mm_image())),
        "p:missing": str(tmp_path / "missing.nii.gz"),
        "p:random": write(tmp_path / "random.nii.gz", np.random.default_rng(2).bytes(4096)),
        "p:truncated": write(tmp_path / "truncated.nii.gz", good_gz[: len(good_gz) // 2]),
        "p:not_nifti": write(tmp_path / "not_nifti.nii.gz", gzip.compress(b"not NIfTI" * 99)),
        "p:2d": write(tmp_path / "2d.nii.gz", encode_nifti_gz(flat)),
        "p:none": None,
    }
    return pa.table({"patient_id": list(paths), "mri_path": list(paths.values())})


def test_bad_rows_get_errors_naming_patient_and_path_and_good_rows_are_cached(
    mri_rows: pa.Table, tmp_path: Path, t1: nib.Nifti1Image, caplog: pytest.LogCaptureFixture
) -> None:
    store = RunStore(str(tmp_path / "run"))

    with caplog.at_level(logging.WARNING, logger="radiag.students.volumes"):
        prepared = prepare_volumes(mri_rows, VolumeConfig(), store)

    assert (prepared.ready, prepared.failed, prepared.cached) == (2, 6, 0)
    table = prepared.table.to_pylist()
    assert [row["patient_id"] for row in table] == mri_rows["patient_id"].to_pylist()
    good, other, *bad = table
    paths = dict(zip(*mri_rows.to_pydict().values(), strict=True))
    for row in bad[:-1]:
        pid = row["patient_id"]
        assert row["volume_path"] is None
        assert row["error"].startswith(f"patient {pid}: cannot use MRI {paths[pid]}: ")
        assert row["error"] in caplog.messages
    assert bad[0]["error"].endswith(": file not found")
    assert "3-D" in bad[-2]["error"]
    assert bad[-1] == {
        "patient_id": "p:none",
        "volume_path": None,
        "error": "patient p:none: no MRI",
    }
    # The cached tensor is exactly what the transform makes from the file.
    assert good["error"] is None and other["error"] is None
    cached = load_volume(store, good["volume_path"])
    np.testing.assert_array_equal(cached, volume_transform(VolumeConfig())(t1))
    assert cached.dtype == np.float32
    assert good["volume_path"].startswith("students/volumes/")
    assert store.exists(other["volume_path"])


def test_a_second_call_reuses_the_cache_without_reading_the_mri_files(
    mri_rows: pa.Table, tmp_path: Path
) -> None:
    store = RunStore(str(tmp_path / "run"))
    first = prepare_volumes(mri_rows, VolumeConfig(), store)
    cache = [store.path(p) for p in first.table["volume_path"].drop_null().to_pylist()]
    mtimes = {path: os.stat(path).st_mtime_ns for path in cache}
    for path in mri_rows["mri_path"].drop_null().to_pylist():  # the sources are gone
        Path(path).unlink(missing_ok=True)

    second = prepare_volumes(mri_rows.slice(0, 2), VolumeConfig(), store)

    assert (second.ready, second.failed, second.cached) == (2, 0, 2)
    assert second.table.equals(first.table.slice(0, 2))
    assert {path: os.stat(path).st_mtime_ns for path in cache} == mtimes


def test_a_config_change_gets_its_own_cache_location(mri_rows: pa.Table, tmp_path: Path) -> None:
    store = RunStore(str(tmp_path / "run"))
    rows = mri_rows.slice(0, 1)
    default = prepare_volumes(rows, VolumeConfig(), store)

    coarse = prepare_volumes(rows, VolumeConfig(pixdim_mm=4.0, spatial_size=(48, 48, 48)), store)

    assert coarse.cached == 0
    old, new = default.table["volume_path"][0].as_py(), coarse.table["volume_path"][0].as_py()
    assert old != new and Path(old).name == Path(new).name  # same patient, other folder
    assert load_volume(store, old).shape == (1, 96, 96, 96)
    assert load_volume(store, new).shape == (1, 48, 48, 48)
    assert VolumeConfig().fingerprint() == VolumeConfig(spatial_size=[96, 96, 96]).fingerprint()


def test_ray_data_tasks_keep_row_order_and_per_row_errors(
    ray_cluster: None, mri_rows: pa.Table, tmp_path: Path
) -> None:
    store = RunStore(str(tmp_path / "run"))
    # Three batches of three: good and bad rows land in different tasks.
    good = mri_rows.slice(0, 2)
    rows = pa.concat_tables(
        [
            good.set_column(0, "patient_id", pa.array(["a", "b"])),
            good.set_column(0, "patient_id", pa.array(["c", "d"])),
            mri_rows.slice(2, 5),  # every unreadable file
        ]
    )

    prepared = prepare_volumes(rows, VolumeConfig(), store, batch_size=3)

    assert prepared.table["patient_id"].to_pylist() == rows["patient_id"].to_pylist()
    assert (prepared.ready, prepared.failed, prepared.cached) == (4, 5, 0)
    assert prepared.table["error"].null_count == 4
    for path in prepared.table["volume_path"].drop_null().to_pylist():
        assert load_volume(store, path).shape == (1, 96, 96, 96)
