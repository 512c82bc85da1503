"""A job's files in the artifact store (``shared.file_objects``): the training, validation and
golden files it reads, and the per-step CSV it writes (``result_files``).

- ``fetch_inputs``: files of a remote store (S3, ...) are downloaded into the job's folder before
  they are read; local stores and files of the older layout are read where they are.
- ``ResultFile``: the CSV grows while the job runs, so it is written on a local disk: in the
  store itself when the store is local (``files/<id>.csv``, readable from the start), else under
  ``<data_dir>/files`` and copied into the store when the job ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.artifact_store import ArtifactStore
from shared.file_objects import local_file, object_key
from shared.job_records import FileStore, JobStore
from shared.job_spec import TrainSpec
from trainer.progress import CSV_HEADER

INPUTS = ("training_file", "validation_file", "golden_file")


def fetch_inputs(spec: TrainSpec, artifacts: ArtifactStore | None, work_dir: Path) -> TrainSpec:
    if artifacts is None or artifacts.is_local:
        return spec
    return spec.model_copy(update={name: local_file(artifacts, value, work_dir)
                                   for name in INPUTS if (value := getattr(spec, name))})


@dataclass
class ResultFile:
    file_id: str
    path: Path  # where the CSV is written
    artifacts: ArtifactStore | None  # a remote store it is copied into at the end

    @classmethod
    def open(cls, store: JobStore, job_id: str, files_dir: Path,
             artifacts: ArtifactStore | None) -> ResultFile:
        """The job's CSV, registered as a file like uploads are."""
        file_id = f"file-{job_id.removeprefix('ftjob-')}"
        key = object_key(file_id, "csv")
        if artifacts is not None and artifacts.is_local:
            path, recorded, remote = Path(artifacts.path(key)), key, None
        else:
            path = files_dir / f"{file_id}.csv"
            recorded, remote = str(path), artifacts
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(CSV_HEADER, encoding="utf-8")
        FileStore(store.db).add(id=file_id, filename=f"{job_id}-results.csv",
                                purpose="fine-tune-results", bytes=len(CSV_HEADER), sha256="",
                                path=recorded, report=None)
        store.set_result_file(job_id, file_id)
        return cls(file_id, path, remote)

    def close(self, store: JobStore) -> None:
        """Record the final size; copy the CSV into a remote store and point the row at it."""
        files = FileStore(store.db)
        size = self.path.stat().st_size
        if self.artifacts is None:
            files.set_bytes(self.file_id, size)
            return
        key = object_key(self.file_id, "csv")
        self.artifacts.fs.put_file(str(self.path), self.artifacts.path(key))
        files.set_bytes(self.file_id, size, path=key)
        self.path.unlink(missing_ok=True)
