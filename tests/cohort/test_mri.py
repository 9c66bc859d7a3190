"""Synthetic T1 volumes: target volumes, T1 contrast, determinism, and the Ray Data stage."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydantic
import pytest
from nilearn import datasets

from radiag.cohort.mri import (
    MriConfig,
    decode_nifti_gz,
    encode_nifti_gz,
    synthesize_mri,
    synthesize_t1,
)
from radiag.store import RunStore

# (hippocampus, ventricles, ICV) in mm^3
SUBJECTS = {
    "small": (5_000.0, 15_000.0, 1_300_000.0),
    "typical": (7_400.0, 32_000.0, 1_500_000.0),
    "enlarged_ventricles": (8_500.0, 90_000.0, 1_700_000.0),
}


def volumes_from_file(path: str | Path) -> tuple[float, float]:
    """(hippocampus, ventricles) mm^3 of a label map on disk, counted independently of radiag."""
    seg = nib.load(path)
    labels = np.asarray(seg.dataobj)  # (X, Y, Z)
    voxel_mm3 = abs(np.linalg.det(seg.affine[:3, :3]))
    return float(np.isin(labels, [1, 2]).sum() * voxel_mm3), float((labels == 3).sum() * voxel_mm3)


@pytest.mark.parametrize("subject", SUBJECTS)
def test_written_segmentation_has_the_target_volumes_within_3_percent(
    subject: str, tmp_path: Path
) -> None:
    hippocampus, ventricles, icv = SUBJECTS[subject]
    t1 = synthesize_t1(hippocampus, ventricles, icv, np.random.default_rng(0))
    path = tmp_path / "seg.nii.gz"
    path.write_bytes(encode_nifti_gz(t1.segmentation))

    achieved_hippocampus, achieved_ventricles = volumes_from_file(path)

    assert achieved_hippocampus == pytest.approx(hippocampus, rel=0.03)
    assert achieved_ventricles == pytest.approx(ventricles, rel=0.03)
    assert (t1.hippocampus_mm3, t1.ventricles_mm3) == (achieved_hippocampus, achieved_ventricles)
    np.testing.assert_allclose(t1.image.affine, t1.segmentation.affine)


def test_both_hippocampi_get_half_the_volume_each() -> None:
    t1 = synthesize_t1(*SUBJECTS["typical"], np.random.default_rng(0))
    labels = np.asarray(t1.segmentation.dataobj)
    left, right = (labels == 1).sum(), (labels == 2).sum()
    assert abs(int(left) - int(right)) <= 1
    # Label 1 is the left hippocampus: negative x in the RAS affine.
    x_left = nib.affines.apply_affine(t1.segmentation.affine, np.argwhere(labels == 1))[:, 0]
    assert (x_left < 0).all()


def test_t1_contrast_csf_darker_than_hippocampal_grey_matter_darker_than_white_matter() -> None:
    t1 = synthesize_t1(*SUBJECTS["typical"], np.random.default_rng(0))
    image = t1.image.get_fdata()  # (X, Y, Z), on the 2 mm template grid
    labels = np.asarray(t1.segmentation.dataobj)
    gm = datasets.load_mni152_gm_mask(resolution=2).get_fdata() > 0
    wm = datasets.load_mni152_wm_mask(resolution=2).get_fdata() > 0
    white_matter = wm & ~gm & (labels == 0)

    ventricles_mean = image[labels == 3].mean()
    hippocampus_mean = image[np.isin(labels, [1, 2])].mean()

    assert t1.image.get_data_dtype() == np.float32
    assert ventricles_mean < hippocampus_mean < image[white_matter].mean()


def test_same_seed_gives_the_same_image_and_another_seed_other_noise() -> None:
    def make(seed: int) -> tuple[np.ndarray, np.ndarray]:
        t1 = synthesize_t1(*SUBJECTS["typical"], np.random.default_rng(seed))
        return t1.image.get_fdata(), np.asarray(t1.segmentation.dataobj)

    (image_a, labels_a), (image_b, _), (image_c, labels_c) = make(1), make(1), make(2)

    np.testing.assert_array_equal(image_a, image_b)
    assert not np.allclose(image_a, image_c)
    # The anatomy depends on the targets only; the seed changes bias and noise.
    np.testing.assert_array_equal(labels_a, labels_c)


@pytest.mark.parametrize(
    ("hippocampus", "ventricles", "icv", "problem"),
    [
        (-7_400.0, 32_000.0, 1.5e6, "hippocampus volume must be positive"),
        (7_400.0, float("nan"), 1.5e6, "ventricles volume must be positive"),
        (500_000.0, 32_000.0, 1.5e6, "hippocampus volume 500000 mm^3 exceeds 2% of brain"),
        (7_400.0, 32_000.0, 1_000.0, "ICV 1000 mm^3 is implausible"),
    ],
)
def test_a_bad_target_raises_value_error_naming_the_problem(
    hippocampus: float, ventricles: float, icv: float, problem: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        synthesize_t1(hippocampus, ventricles, icv, np.random.default_rng(0))


def test_nifti_gz_round_trip_keeps_data_and_affine(tmp_path: Path) -> None:
    t1 = synthesize_t1(*SUBJECTS["small"], np.random.default_rng(0))
    data = encode_nifti_gz(t1.image)
    (tmp_path / "t1.nii.gz").write_bytes(data)

    assert data[:2] == b"\x1f\x8b"  # gzip magic: a real .nii.gz
    assert gzip.decompress(data) == t1.image.to_bytes()
    for img in (decode_nifti_gz(data), nib.load(tmp_path / "t1.nii.gz")):
        np.testing.assert_array_equal(img.get_fdata(), t1.image.get_fdata())
        np.testing.assert_allclose(img.affine, t1.image.affine)


def test_volumes_round_trip_through_an_s3_run_store(s3_endpoint: str) -> None:
    # pyarrow streams gunzip `.gz` paths on read; decoding must not care.
    t1 = synthesize_t1(*SUBJECTS["small"], np.random.default_rng(0))
    store = RunStore("s3://radiag/test-mri")
    store.write_bytes("mri/x_seg.nii.gz", encode_nifti_gz(t1.segmentation))

    back = decode_nifti_gz(store.read_bytes("mri/x_seg.nii.gz"))

    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(t1.segmentation.dataobj))
    np.testing.assert_allclose(back.affine, t1.segmentation.affine)


def test_config_rejects_unknown_resolution_and_fields() -> None:
    with pytest.raises(pydantic.ValidationError):
        MriConfig(resolution_mm=3)
    with pytest.raises(pydantic.ValidationError):
        MriConfig(nosie=0.1)


def cohort_rows() -> pd.DataFrame:
    """Three good subjects and one with a negative hippocampus, in one batch of four."""
    rows = [(f"synthetic:{name}:bl", *volumes) for name, volumes in SUBJECTS.items()]
    rows.append(("synthetic:broken:bl", -1.0, 30_000.0, 1.5e6))
    return pd.DataFrame(rows, columns=["patient_id", "Hippocampus", "Ventricles", "ICV"])


def test_stage_writes_readable_volumes_and_reports_a_bad_row(
    ray_cluster: None, tmp_path: Path
) -> None:
    rows = cohort_rows()
    store = RunStore(str(tmp_path / "run"))

    out = synthesize_mri(rows, store, MriConfig(subjects=4))

    assert list(out["patient_id"]) == list(rows["patient_id"])
    good, bad = out.iloc[:3], out.iloc[3]
    for row, (hippocampus, ventricles, _) in zip(good.itertuples(), SUBJECTS.values(), strict=True):
        assert pd.isna(row.error)
        assert row.mri_path == store.uri_of(f"mri/{row.patient_id.replace(':', '_')}.nii.gz")
        assert nib.load(row.mri_path).get_data_dtype() == np.float32
        achieved = volumes_from_file(row.segmentation_path)
        assert achieved == (row.mri_hippocampus_mm3, row.mri_ventricles_mm3)
        assert achieved == pytest.approx((hippocampus, ventricles), rel=0.03)
    assert bad[["mri_path", "segmentation_path", "mri_hippocampus_mm3"]].isna().all()
    assert "synthetic:broken:bl" in bad.error and "hippocampus" in bad.error
    assert not store.exists("mri/synthetic_broken_bl.nii.gz")


def test_stage_rerun_skips_existing_files_and_returns_the_same_volumes(
    ray_cluster: None, tmp_path: Path
) -> None:
    rows = cohort_rows().iloc[:3]
    store = RunStore(str(tmp_path / "run"))
    first = synthesize_mri(rows, store, MriConfig(subjects=3))
    written = [*first["mri_path"], *first["segmentation_path"]]
    mtimes = {path: os.stat(path).st_mtime_ns for path in written}

    second = synthesize_mri(rows, store, MriConfig(subjects=3))

    assert {path: os.stat(path).st_mtime_ns for path in written} == mtimes
    pd.testing.assert_frame_equal(second, first)
