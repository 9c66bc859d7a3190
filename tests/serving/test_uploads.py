"""A T1 sent to the app is checked before any model sees it: bounded once gunzipped, whole,
and one finite 3-D volume (the served app's own routes: tests/serving/test_api.py)."""

from __future__ import annotations

import gzip
import zlib

import nibabel as nib
import numpy as np
import pytest

from radiag.serving.app import VolumeTooLarge, gunzip_at_most, nifti_problem

pytestmark = pytest.mark.reliability

MB = 2**20


def nifti(voxels: np.ndarray) -> bytes:
    return nib.Nifti1Image(voxels, np.eye(4)).to_bytes()


def test_a_gzip_bomb_is_refused_without_inflating_it() -> None:
    bomb = gzip.compress(b"\0" * (64 * MB), compresslevel=9)
    assert len(bomb) < MB
    with pytest.raises(VolumeTooLarge):
        gunzip_at_most(bomb, limit=8 * MB)
    assert len(gunzip_at_most(bomb, limit=64 * MB)) == 64 * MB


def test_a_truncated_gzip_is_an_error_and_plain_bytes_pass_through() -> None:
    whole = gzip.compress(nifti(np.ones((8, 8, 8), np.float32)))
    with pytest.raises(zlib.error, match="ends early"):
        gunzip_at_most(whole[: len(whole) // 2], limit=MB)
    assert gunzip_at_most(b"plain", limit=MB) == b"plain"


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (nifti(np.ones((8, 8), np.float32)), "expected one 3-D volume"),
        (nifti(np.ones((8, 8, 8, 2), np.float32)), "expected one 3-D volume"),
        (nifti(np.full((8, 8, 8), np.nan, np.float32)), "non-finite voxel values"),
        (nifti(np.ones((8, 8, 8), np.float32))[:400], "not a NIfTI file"),
        (b"not a nifti at all", "not a NIfTI file"),
    ],
    ids=["2-D", "4-D", "NaN", "truncated", "garbage"],
)
def test_a_volume_the_mri_student_cannot_use_is_named_with_the_reason(
    data: bytes, problem: str
) -> None:
    assert problem in (nifti_problem(data) or "")


def test_a_usable_volume_has_no_problem() -> None:
    assert nifti_problem(nifti(np.random.default_rng(0).random((8, 8, 8), np.float32))) is None
