"""T1 volumes for the MRI+text student: NIfTI in, a fixed-size normalised tensor out, cached.

The cohort stage records each visit's `mri_path` (a local path or `s3://` URI). Here each
volume is read as bytes through `filesystem_for`, decoded with nibabel and passed through
MONAI transforms: orientation, isotropic resampling, crop/pad, z-score. The result is cached
in the run store as `.npy`, under a folder named by a fingerprint of the config, so a config
change never reads stale tensors and a rerun reads nothing it has already made.

A file that cannot be used (missing, not gzip, not NIfTI, not 3-D) fails its own row only:
the row gets an `error` naming the patient and the path, and the rest continue.

Example:
    prepared = prepare_volumes(rows, VolumeConfig(), store)  # rows: patient_id, mri_path
    volume = load_volume(store, prepared.table["volume_path"][0].as_py())  # (1, 96, 96, 96)
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from pydantic import Field, PositiveInt, field_validator

from radiag.cohort.mri import decode_nifti_gz
from radiag.config import StrictModel
from radiag.store import RunStore, filesystem_for

log = logging.getLogger(__name__)

CACHE_DIR = "students/volumes"  # run-relative; one subfolder per config fingerprint
# Bump when the transform changes in a way the config does not show: old caches go stale.
_TRANSFORM_VERSION = 1
# nibabel affines map voxels to RAS+ world coordinates (x right, y anterior, z superior).
_NIBABEL_AXES = (("L", "R"), ("P", "A"), ("I", "S"))
_AXIS_OF = {code: axis for axis, pair in enumerate(_NIBABEL_AXES) for code in pair}
_BATCH_SCHEMA = pa.schema(
    [("row", pa.int64()), ("patient_id", pa.string()), ("volume_path", pa.string()),
     ("error", pa.string()), ("cached", pa.bool_())]
)  # fmt: skip
OUTPUT_COLUMNS = ["patient_id", "volume_path", "error"]


class VolumeConfig(StrictModel):
    """How a T1 becomes the student's input tensor; every field changes the cache location."""

    pixdim_mm: float = Field(2.0, gt=0, description="Isotropic voxel size after resampling.")
    spatial_size: tuple[PositiveInt, PositiveInt, PositiveInt] = Field(
        (96, 96, 96), description="(D, H, W) after a centred crop or zero pad."
    )
    orientation: str = Field(
        "RAS", description="Axis codes the voxel axes are turned to, e.g. RAS or LPS."
    )

    @field_validator("orientation")
    @classmethod
    def _one_code_per_axis(cls, value: str) -> str:
        if sorted(_AXIS_OF.get(code, -1) for code in value) != [0, 1, 2]:
            raise ValueError(f"{value!r}: need one of L/R, one of P/A and one of I/S")
        return value

    def fingerprint(self) -> str:
        """Short hash of the fields and the transform version: names the cache folder."""
        payload = f"{_TRANSFORM_VERSION}:{self.model_dump_json()}"
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


class PreparedVolumes(NamedTuple):
    """`table`: patient_id, volume_path (run-relative `.npy`, null on error), error.

    `ready` rows have a volume (`cached` of them were made by an earlier call); `failed` rows
    have an error (no MRI, or an MRI that cannot be used): ready + failed == table.num_rows.
    """

    table: pa.Table
    ready: int
    failed: int
    cached: int


def volume_transform(cfg: VolumeConfig) -> Callable[[nib.Nifti1Image], np.ndarray]:
    """The MONAI preprocessing of one image, as a plain callable.

    Orientation to `cfg.orientation`, bilinear resampling to `cfg.pixdim_mm` (zeros outside
    the field of view), centred crop or zero pad to `cfg.spatial_size`, then z-score over the
    nonzero voxels (the padding stays 0 and does not count).

    Returns:
        A function from a nibabel image (3-D, or 4-D with one volume) to float32 `(1, D, H, W)`.

    Raises:
        ValueError: (from the returned function) the image is not one 3-D volume, has
            non-finite voxels or a singular affine.
    """
    # torch and MONAI load here, not with the module: configs and the CLI import it.
    import torch
    from monai.data import MetaTensor
    from monai.transforms import (
        Compose,
        NormalizeIntensity,
        Orientation,
        ResizeWithPadOrCrop,
        Spacing,
    )

    pipeline = Compose(
        [
            Orientation(axcodes=cfg.orientation, labels=_NIBABEL_AXES),
            Spacing(pixdim=cfg.pixdim_mm, mode="bilinear", padding_mode="zeros", dtype=np.float32),
            ResizeWithPadOrCrop(spatial_size=cfg.spatial_size),
            NormalizeIntensity(nonzero=True, dtype=np.float32),
        ]
    )

    def transform(image: nib.Nifti1Image) -> np.ndarray:
        voxels, affine = checked_voxels(image)  # (X, Y, Z), (4, 4)
        tensor = MetaTensor(torch.from_numpy(voxels[None]), affine=torch.from_numpy(affine))
        return pipeline(tensor).as_tensor().numpy()  # (1, D, H, W)

    return transform


def checked_voxels(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Voxels as float32 (X, Y, Z) and the affine, or ValueError for what MONAI cannot use."""
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:  # a 3-D volume stored with a time axis of one
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"expected one 3-D volume, got shape {image.shape}")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise ValueError("singular or non-finite affine")
    # Contiguous: a reoriented nibabel image has negative strides, which torch refuses.
    voxels = np.ascontiguousarray(image.get_fdata(dtype=np.float32).reshape(shape))
    if not np.isfinite(voxels).all():
        raise ValueError("non-finite voxel values")
    return voxels, affine


def prepare_volumes(
    rows: pa.Table,
    cfg: VolumeConfig,
    store: RunStore,
    *,
    batch_size: int = 4,
    num_cpus: float = 1.0,
) -> PreparedVolumes:
    """Transform and cache every row's MRI; reuse what an earlier call cached.

    With Ray initialised, batches run as Ray Data tasks; without it, in this process. Failed
    rows are logged. Each new Ray worker spends seconds importing MONAI and torch once. A
    task runs torch on one thread (Ray sets OMP_NUM_THREADS=1 up to one CPU), so half a CPU
    per task only oversubscribes the cores; it helps only where other work holds some.

    Args:
        rows: `patient_id` and `mri_path` (local path or `s3://` URI; null = no MRI).
        cfg: the transform; its fingerprint names the cache folder.
        store: the run store the `.npy` files go to.
        batch_size: rows per Ray task. Default: 4.
        num_cpus: CPUs reserved per Ray task. Default: 1.0.

    Returns:
        One row per input row, in input order, and the counts (see `PreparedVolumes`).
    """
    count = rows.num_rows
    todo = pa.table(
        {
            "row": pa.array(np.arange(count), pa.int64()),
            "patient_id": rows["patient_id"].cast(pa.string()),
            "mri_path": rows["mri_path"].cast(pa.string()),
        }
    )
    kwargs = {"store_uri": store.uri, "cfg": cfg.model_dump()}
    if count and ray.is_initialized():
        # One block per batch, so that batches spread over the cluster's CPUs.
        blocks = [todo.slice(start, batch_size) for start in range(0, count, batch_size)]
        dataset = ray.data.from_arrow(blocks).map_batches(
            _prepare_batch, batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus,
            fn_kwargs=kwargs,
        )  # fmt: skip
        done = pa.concat_tables(ray.get(dataset.to_arrow_refs()))
    else:
        done = _prepare_batch(todo, **kwargs)
    done = done.sort_by("row")  # Ray does not keep row order across tasks
    for error in done["error"].drop_null().to_pylist():
        log.warning(error)
    ready = done["error"].null_count  # a row without error has a volume
    cached = pc.sum(done["cached"]).as_py() or 0
    return PreparedVolumes(done.select(OUTPUT_COLUMNS), ready, count - ready, cached)


def _prepare_batch(batch: pa.Table, store_uri: str, cfg: dict[str, Any]) -> pa.Table:
    """Ray task: one cached `.npy` or one error per row, in `_BATCH_SCHEMA`."""
    config, store = VolumeConfig.model_validate(cfg), RunStore(store_uri)
    transform = volume_transform(config)
    cache_dir = f"{CACHE_DIR}/{config.fingerprint()}"
    out = []
    for row in batch.to_pylist():
        pid, uri = row["patient_id"], row["mri_path"]
        result = {"row": row["row"], "patient_id": pid}
        relative = f"{cache_dir}/{re.sub(r'[^A-Za-z0-9_.-]', '_', pid)}.npy"
        if uri is None:
            result["error"] = f"patient {pid}: no MRI"
        elif store.exists(relative):  # made by an earlier call with the same config
            result |= {"volume_path": relative, "cached": True}
        else:
            try:
                volume = transform(_read_nifti(uri))  # (1, D, H, W)
            except Exception as err:  # gzip, nibabel, pyarrow and MONAI have no common base
                result["error"] = f"patient {pid}: cannot use MRI {uri}: {_reason(err)}"
            else:
                store.write_bytes(relative, _npy_bytes(volume))
                result |= {"volume_path": relative, "cached": False}
        out.append(result)
    return pa.Table.from_pylist(out, schema=_BATCH_SCHEMA)  # missing keys become nulls


def _read_nifti(uri: str) -> nib.Nifti1Image:
    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path, compression=None) as stream:
        return decode_nifti_gz(stream.read())


def _reason(err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return "file not found"
    return f"{type(err).__name__}: {err}"


def _npy_bytes(volume: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, volume, allow_pickle=False)
    return buffer.getvalue()


def load_volume(store: RunStore, volume_path: str) -> np.ndarray:
    """A volume cached by `prepare_volumes`: float32 `(1, D, H, W)`."""
    return np.load(io.BytesIO(store.read_bytes(volume_path)), allow_pickle=False)
