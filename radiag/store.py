"""The run store: one directory per run, local or `s3://`, one subfolder per stage.

Tables are Parquet keyed by `patient_id`. Paths go through `pyarrow.fs`, so the
same code writes to a laptop disk, a shared filesystem or an S3 bucket
(an S3-compatible endpoint such as MinIO is set with `AWS_ENDPOINT_URL`).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from radiag.errors import UserError


class StoreUnreachable(UserError, RuntimeError):
    """The run store stopped answering mid-stage (an S3 outage, a full disk); user-facing."""


def storage_failure(err: BaseException) -> OSError | None:
    """The filesystem error behind `err`, however Ray wrapped it (a Ray Data actor's
    RayTaskError -> UserCodeException -> the OSError pyarrow raised, or that chain's
    traceback text), or None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]
    # A Ray Data actor's error can reach the driver as the remote traceback's text only.
    lines = [line.strip() for line in str(err).splitlines()]
    named = [line for line in lines if line.startswith("OSError: ")]
    return OSError(named[-1].removeprefix("OSError: ")) if named else None


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return the pyarrow filesystem and the path inside it for a local path or `s3://` URI."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
        if endpoint:
            endpoint_url = urlparse(endpoint)
            kwargs["endpoint_override"] = endpoint_url.netloc
            kwargs["scheme"] = endpoint_url.scheme or "https"
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


class RunStore:
    """Read and write a run's tables and files, relative to the run directory.

    Example:
        store = RunStore("s3://bucket/runs/demo")
        store.write_table("cohort/cohort.parquet", table)
        table = store.read_table("cohort/cohort.parquet")
    """

    def __init__(self, uri: str) -> None:
        self.fs, self.root = filesystem_for(uri.rstrip("/"))
        # A local run is named by its absolute path: workers may run in another directory.
        self.uri = uri.rstrip("/") if uri.startswith("s3://") else self.root

    def path(self, relative: str) -> str:
        """Path inside the filesystem for a run-relative path."""
        return posixpath.join(self.root, relative)

    def uri_of(self, relative: str) -> str:
        """User-facing location (local path or s3:// URI) of a run-relative path."""
        return posixpath.join(self.uri, relative)

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def list_files(self, directory: str, suffix: str = "") -> list[str]:
        """Run-relative paths of the files directly in `directory` ending with `suffix`, sorted."""
        return [path for path, _ in self.file_sizes(directory, suffix)]

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write atomically where the filesystem allows: a reader never sees half a file."""
        final = self.path(relative)
        self.fs.create_dir(posixpath.dirname(final), recursive=True)
        if isinstance(self.fs, pafs.LocalFileSystem):
            partial = f"{final}.{uuid.uuid4().hex}.partial"
            with self.fs.open_output_stream(partial, compression=None) as out:
                out.write(data)
            self.fs.move(partial, final)
        else:  # an S3 PUT is atomic already
            with self.fs.open_output_stream(final, compression=None) as out:
                out.write(data)

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative), compression=None) as stream:
            return stream.read()

    def write_table(self, relative: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(relative, sink.getvalue().to_pybytes())

    def read_table(self, relative: str) -> pa.Table:
        return pq.read_table(self.path(relative), filesystem=self.fs)

    def write_json(self, relative: str, payload: dict[str, Any]) -> None:
        self.write_bytes(relative, json.dumps(payload, indent=2, default=str).encode())

    def read_json(self, relative: str) -> dict[str, Any]:
        return json.loads(self.read_bytes(relative))

    def upload_dir(self, local: Path, relative: str) -> None:
        """Copy a local directory tree to `relative` (an exported model, say)."""
        self.fs.create_dir(self.path(relative), recursive=True)
        pafs.copy_files(
            str(local.resolve()), self.path(relative),
            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs,
        )  # fmt: skip

    def download_dir(self, relative: str, local: Path) -> None:
        """Copy `relative` into a local directory (libraries that only open local paths)."""
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            self.path(relative), str(local.resolve()),
            source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem(),
        )  # fmt: skip

    def file_sizes(self, directory: str, suffix: str = "") -> list[tuple[str, int]]:
        """(run-relative path, size) of the files directly in `directory` ending with `suffix`."""
        selector = pafs.FileSelector(self.path(directory), allow_not_found=True)
        return sorted(
            (posixpath.relpath(info.path, self.root), info.size)
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.path.endswith(suffix)
        )

    def move_dir(self, relative: str, destination: str) -> None:
        """Move a directory tree inside the run (S3 has no rename: copy, then delete)."""
        target = self.path(destination)
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        if isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.move(self.path(relative), target)
            return
        self.fs.create_dir(target, recursive=True)
        pafs.copy_files(
            self.path(relative), target, source_filesystem=self.fs, destination_filesystem=self.fs
        )
        self.fs.delete_dir(self.path(relative))

    def delete_file(self, relative: str) -> None:
        self.fs.delete_file(self.path(relative))
