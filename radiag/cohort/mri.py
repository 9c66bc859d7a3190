"""Synthetic T1 volumes, so the vision-language student has real NIfTI files to read.

Each volume is the MNI152 template with its lateral ventricles grown or shrunk and two
ellipsoidal hippocampi painted in, both to the subject's target volumes, in an affine
scaled to the subject's head size (ICV). Only what nilearn ships offline is used; there
is no labelled atlas offline, hence the geometric hippocampi.

Licence: MNI ICBM152 2009a nonlinear symmetric template as shipped in nilearn (its
datasets/description/icbm152_2009.rst says "License: unknown"); the McGill original is
under the permissive MNI notice "Copyright (C) 1993-2009 Louis Collins, McConnell Brain
Imaging Centre, Montreal Neurological Institute, McGill University" (any use, no fee).
"""

from __future__ import annotations

import functools
import gzip
import re
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow as pa
import ray
from pydantic import Field
from scipy import ndimage as ndi

from radiag.config import StrictModel
from radiag.store import RunStore

HIPPO_LEFT, HIPPO_RIGHT, VENTRICLES = 1, 2, 3  # segmentation labels
# Hippocampus model in MNI mm: centres, semi-axes (lateral, long, vertical; only their
# ratios matter) and a long axis pitched up and yawed medially going posterior.
_HIPPO_CENTRES_MM = {HIPPO_LEFT: (-26.0, -22.0, -14.0), HIPPO_RIGHT: (26.0, -22.0, -14.0)}
_HIPPO_SEMI_AXES, _HIPPO_PITCH_DEG, _HIPPO_YAW_DEG = (6.0, 20.0, 7.0), 30.0, 15.0
# Lateral ventricles: template voxels darker than half white matter in this MNI box (mm).
_VENTRICLE_BOX_MM, _VENTRICLE_DARK = ((-32, 32), (-50, 35), (-10, 35)), 0.5
# Targets outside these limits are data errors, not anatomy.
_ICV_RATIO = (0.4, 2.5)  # ICV / template brain volume
_MAX_FRACTION = {"hippocampus": 0.02, "ventricles": 0.2}  # of the scaled brain volume
_MIN_VOXELS = 20  # per structure: voxel quantisation stays below 2.5%
OUTPUT_SCHEMA = pa.schema(
    [("patient_id", pa.string()), ("mri_path", pa.string()), ("segmentation_path", pa.string()),
     ("mri_hippocampus_mm3", pa.float64()), ("mri_ventricles_mm3", pa.float64()),
     ("error", pa.string())]
)  # fmt: skip


class MriConfig(StrictModel):
    """Synthetic T1 volumes for a subset of the cohort (the caller picks the subjects)."""

    subjects: int = Field(0, ge=0, description="How many subjects get a volume; 0 disables.")
    resolution_mm: Literal[1, 2] = Field(2, description="Isotropic voxel size of the template.")
    bias_field: float = Field(0.1, ge=0, le=1, description="Max relative bias-field amplitude.")
    noise: float = Field(0.02, ge=0, description="Noise std relative to white-matter intensity.")
    seed: int = Field(0, ge=0, description="Base seed; each subject mixes in its patient_id.")


@dataclass(frozen=True)
class SyntheticT1:
    """A T1, its labels (1/2 left/right hippocampus, 3 lateral ventricles), volumes in mm^3."""

    image: nib.Nifti1Image
    segmentation: nib.Nifti1Image
    hippocampus_mm3: float
    ventricles_mm3: float


@dataclass(frozen=True)
class _Template:
    """What does not depend on the subject, computed once per process; never mutated."""

    affine: np.ndarray  # (4, 4) voxel -> MNI mm
    t1: np.ndarray  # (X, Y, Z) float32, white matter = 1
    brain: np.ndarray  # (N,) flat indices of brain voxels
    ventricles: np.ndarray  # (X, Y, Z) bool, the template's lateral ventricles
    ventricle_score: np.ndarray  # (N,) signed distance to them, in voxels
    hippo_radius: dict[int, np.ndarray]  # label -> (N,) normalised ellipsoid radius
    brain_mm3: float
    gm: float  # tissue intensities relative to white matter
    csf: float


def _ellipsoid_radius(points: np.ndarray, centre: tuple[float, float, float]) -> np.ndarray:
    """Normalised radius of (3, N) mm points in the tilted hippocampus ellipsoid: (N,)."""
    pitch, yaw = np.deg2rad(_HIPPO_PITCH_DEG), np.deg2rad(np.sign(centre[0]) * _HIPPO_YAW_DEG)
    long_axis = np.array([np.sin(yaw), np.cos(pitch), -np.sin(pitch)])  # anterior, down
    long_axis /= np.linalg.norm(long_axis)
    lateral = np.cross(long_axis, [0.0, 0.0, 1.0])
    lateral /= np.linalg.norm(lateral)
    axes = np.stack([lateral, long_axis, np.cross(lateral, long_axis)])  # (3, 3)
    local = axes @ (points - np.array(centre)[:, None])  # (3, N)
    return np.linalg.norm(local / np.array(_HIPPO_SEMI_AXES)[:, None], axis=0)


@functools.lru_cache(maxsize=2)
def _template(resolution_mm: int) -> _Template:
    """Load the template, find its lateral ventricles, lay out the hippocampus fields."""
    from nilearn import datasets  # with scikit-learn behind it: only where volumes are made

    img = datasets.load_mni152_template(resolution=resolution_mm)
    data = img.get_fdata(dtype=np.float32)  # (X, Y, Z)
    brain = datasets.load_mni152_brain_mask(resolution=resolution_mm).get_fdata() > 0
    gm = datasets.load_mni152_gm_mask(resolution=resolution_mm).get_fdata() > 0
    wm = datasets.load_mni152_wm_mask(resolution=resolution_mm).get_fdata() > 0
    # nilearn's GM and WM masks are generous and overlap: tissue levels use exclusive parts.
    t1 = data / np.median(data[wm & ~gm])
    ijk = np.indices(data.shape, dtype=np.float32).reshape(3, -1)  # (3, X*Y*Z)
    xyz = img.affine[:3, :3] @ ijk + img.affine[:3, 3:]  # (3, X*Y*Z) mm
    lo, hi = np.array(_VENTRICLE_BOX_MM, dtype=np.float32).T[:, :, None]  # (3, 1) each
    box = np.all((lo <= xyz) & (xyz <= hi), axis=0)  # (X*Y*Z,)
    labels, count = ndi.label(brain & box.reshape(data.shape) & (t1 < _VENTRICLE_DARK))
    sizes = np.bincount(labels.ravel())  # (K + 1,)
    sizes[0] = 0  # background
    x_mean = ndi.mean(xyz[0].reshape(data.shape), labels, np.arange(count + 1))
    # The largest dark component on each side is a lateral ventricle; the midline ones
    # (third ventricle, cisterns) are not.
    keep = [int(np.argmax(np.where(side, sizes, 0))) for side in (x_mean < -5, x_mean > 5)]
    ventricles = np.isin(labels, keep)
    sdf = ndi.distance_transform_edt(~ventricles) - ndi.distance_transform_edt(ventricles)
    flat = np.flatnonzero(brain)
    # Darker voxels first among equal distances: a deterministic, anatomical tie-break.
    score = (sdf.ravel()[flat] + 1e-3 * t1.ravel()[flat]).astype(np.float32)
    return _Template(
        affine=img.affine, t1=t1.astype(np.float32), brain=flat, ventricles=ventricles,
        ventricle_score=score,
        hippo_radius={k: _ellipsoid_radius(xyz[:, flat], c) for k, c in _HIPPO_CENTRES_MM.items()},
        brain_mm3=flat.size * resolution_mm**3,
        gm=float(np.median(t1[gm & ~wm])), csf=float(np.median(t1[brain & ~gm & ~wm])),
    )  # fmt: skip


def _smallest(score: np.ndarray, count: int) -> np.ndarray:
    """Positions of the `count` lowest scores: an exact voxel count, whatever the ties."""
    return np.argpartition(score, count - 1)[:count]


def _label_volumes(segmentation: nib.Nifti1Image) -> tuple[float, float]:
    """(hippocampus, ventricles) in mm^3: voxel counts times the affine's voxel volume."""
    counts = np.bincount(np.asarray(segmentation.dataobj).ravel(), minlength=4)  # (4,)
    voxel_mm3 = abs(np.linalg.det(segmentation.affine[:3, :3]))
    return float((counts[1] + counts[2]) * voxel_mm3), float(counts[3] * voxel_mm3)


def _voxel_targets(targets: dict[str, float], tmpl: _Template, voxel_mm3: float) -> dict[str, int]:
    """Voxel counts on the template grid; ValueError for targets that are not anatomy."""
    for name, value in targets.items():
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"{name} volume must be positive and finite, got {value:g} mm^3")
    ratio = targets["ICV"] / tmpl.brain_mm3  # s^3
    if not _ICV_RATIO[0] <= ratio <= _ICV_RATIO[1]:
        raise ValueError(f"ICV {targets['ICV']:.0f} mm^3 is implausible for a human head")
    counts = {}
    for name, limit in _MAX_FRACTION.items():
        if targets[name] > limit * tmpl.brain_mm3 * ratio:
            raise ValueError(f"{name} volume {targets[name]:.0f} mm^3 exceeds {limit:.0%} of brain")
        counts[name] = round(targets[name] / (voxel_mm3 * ratio))
        if counts[name] < 2 * _MIN_VOXELS:
            raise ValueError(f"{name} volume {targets[name]} mm^3 is too small to voxelise")
    return counts


def synthesize_t1(
    hippocampus_mm3: float,
    ventricles_mm3: float,
    icv_mm3: float,
    rng: np.random.Generator,
    *,
    resolution_mm: Literal[1, 2] = 2,
    bias_field: float = 0.1,
    noise: float = 0.02,
) -> SyntheticT1:
    """Make a T1 whose hippocampi and lateral ventricles have the target volumes.

    Args:
        hippocampus_mm3: both hippocampi, split evenly between the sides.
        ventricles_mm3: lateral ventricles.
        icv_mm3: intracranial volume; scales the affine so physical volumes fit the head.
        rng: the only source of randomness (bias field, then noise); anatomy is exact.
        resolution_mm: template voxel size. Default: 2.
        bias_field: max relative amplitude of the multiplicative bias. Default: 0.1.
        noise: Gaussian noise std relative to white matter (= 1). Default: 0.02.

    Raises:
        ValueError: a target is non-positive, not finite, too small or implausibly large.
    """
    tmpl = _template(resolution_mm)
    targets = {"hippocampus": hippocampus_mm3, "ventricles": ventricles_mm3, "ICV": icv_mm3}
    counts = _voxel_targets(targets, tmpl, float(resolution_mm**3))
    left = counts["hippocampus"] // 2
    seg = np.zeros(tmpl.t1.size, dtype=np.uint8)  # (X*Y*Z,)
    for label, count in ((HIPPO_LEFT, left), (HIPPO_RIGHT, counts["hippocampus"] - left)):
        seg[tmpl.brain[_smallest(tmpl.hippo_radius[label], count)]] = label
    # Grow or shrink the template ventricles along their distance field, around the hippocampi.
    score = np.where(seg[tmpl.brain] == 0, tmpl.ventricle_score, np.inf)  # (N,)
    seg[tmpl.brain[_smallest(score, counts["ventricles"])]] = VENTRICLES
    seg = seg.reshape(tmpl.t1.shape)  # (X, Y, Z)

    t1 = tmpl.t1.copy()  # (X, Y, Z)
    t1[tmpl.ventricles & (seg != VENTRICLES)] = 1.0  # shrunk ventricles become white matter
    t1[seg == VENTRICLES] = tmpl.csf
    t1[(seg == HIPPO_LEFT) | (seg == HIPPO_RIGHT)] = tmpl.gm
    # Partial volume: soften the painted voxels and a one-voxel rim around them.
    rim = ndi.binary_dilation((seg > 0) | tmpl.ventricles)
    t1[rim] = ndi.gaussian_filter(t1, sigma=0.5)[rim]

    # Smooth bias: exp of a random quadratic in coordinates normalised to [-1, 1].
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in t1.shape),
                          indexing="ij", sparse=True)  # fmt: skip
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    coefs = rng.standard_normal(len(terms), dtype=np.float32)
    poly = sum(c * term for c, term in zip(coefs, terms, strict=True))  # (X, Y, Z)
    t1 *= np.exp(bias_field * poly / np.abs(poly).max())
    t1 += noise * rng.standard_normal(t1.shape, dtype=np.float32)

    scale = (icv_mm3 / tmpl.brain_mm3) ** (1 / 3)
    affine = np.diag([scale, scale, scale, 1.0]) @ tmpl.affine  # MNI origin stays put
    segmentation = _nifti(seg, affine)
    hippo, vents = _label_volumes(segmentation)
    return SyntheticT1(_nifti(t1, affine), segmentation, hippo, vents)


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def encode_nifti_gz(img: nib.Nifti1Image) -> bytes:
    """`.nii.gz` bytes any RunStore (local or s3) can hold; mtime 0 keeps them reproducible."""
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def decode_nifti_gz(data: bytes) -> nib.Nifti1Image:
    """Inverse of `encode_nifti_gz`; also takes plain NIfTI bytes, because pyarrow streams
    (RunStore.read_bytes) transparently gunzip a `.gz` path."""
    return nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def _synthesize_rows(batch: pd.DataFrame, store_uri: str, cfg: dict[str, Any]) -> pa.Table:
    """Ray task: one volume and label map per row; resumes and records per-row failures."""
    config, store = MriConfig.model_validate(cfg), RunStore(store_uri)
    out: list[dict[str, Any]] = []
    for row in batch.itertuples(index=False):
        pid = str(row.patient_id)
        stem = "mri/" + re.sub(r"[^A-Za-z0-9_.-]", "_", pid)
        image_rel, seg_rel = f"{stem}.nii.gz", f"{stem}_seg.nii.gz"
        if store.exists(image_rel) and store.exists(seg_rel):  # done by an earlier run
            hippo, vents = _label_volumes(decode_nifti_gz(store.read_bytes(seg_rel)))
        else:
            rng = np.random.default_rng([config.seed, zlib.crc32(pid.encode())])
            try:
                t1 = synthesize_t1(
                    row.Hippocampus, row.Ventricles, row.ICV, rng,
                    resolution_mm=config.resolution_mm, bias_field=config.bias_field,
                    noise=config.noise,
                )  # fmt: skip
            except ValueError as err:
                out.append({"patient_id": pid, "error": f"patient {pid}: {err}"})
                continue
            store.write_bytes(image_rel, encode_nifti_gz(t1.image))
            store.write_bytes(seg_rel, encode_nifti_gz(t1.segmentation))  # last: marks done
            hippo, vents = t1.hippocampus_mm3, t1.ventricles_mm3
        out.append({"patient_id": pid, "mri_path": store.uri_of(image_rel),
                    "segmentation_path": store.uri_of(seg_rel),
                    "mri_hippocampus_mm3": hippo, "mri_ventricles_mm3": vents})  # fmt: skip
    return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)  # missing keys become nulls


def synthesize_mri(
    rows: pd.DataFrame, store: RunStore, cfg: MriConfig, *, batch_size: int = 4
) -> pd.DataFrame:
    """Write `mri/<id>.nii.gz` and `mri/<id>_seg.nii.gz` for every row, with Ray Data.

    Plain function tasks at 1 CPU each (an actor pool can deadlock on 2 CPUs). Rows whose
    two files exist are read back, not regenerated. Ray must already be initialised.

    Args:
        rows: `patient_id`, `Hippocampus`, `Ventricles`, `ICV` (mm^3) of the chosen subjects.
        store: the run directory.
        cfg: resolution, bias, noise and seed.
        batch_size: rows per task. Default: 4.

    Returns:
        One row per input row, in input order, with the columns of `OUTPUT_SCHEMA`; a failed
        row has null paths and volumes and an `error` naming the patient and the problem.
    """
    if rows.empty:
        return OUTPUT_SCHEMA.empty_table().to_pandas()
    rows = rows[["patient_id", "Hippocampus", "Ventricles", "ICV"]].reset_index(drop=True)
    # One block per batch, so that batches spread over the cluster's CPUs.
    blocks = [rows.iloc[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    dataset = ray.data.from_pandas(blocks).map_batches(
        _synthesize_rows, batch_size=batch_size, batch_format="pandas", num_cpus=1,
        fn_kwargs={"store_uri": store.uri, "cfg": cfg.model_dump()},
    )  # fmt: skip
    table = pa.concat_tables(ray.get(dataset.to_arrow_refs()))
    # Ray does not keep row order across tasks: restore the caller's.
    position = {pid: i for i, pid in reversed(list(enumerate(rows["patient_id"])))}
    order = np.argsort([position[pid] for pid in table["patient_id"].to_pylist()], kind="stable")
    return table.take(order).to_pandas()
