"""Uploaded training files (OpenAI's `/v1/files`): one folder per file under the jobs directory.

`<root>/file-<id>/<original name>` holds the bytes and `<root>/file-<id>/file.json` the OpenAI file
object. The original name is kept, so the dataset doctor's errors name the file the user uploaded.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

META = "file.json"
PURPOSES = ("fine-tune", "evals")  # what this server stores files for: training data, eval items
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class FileError(ValueError):
    """An upload or lookup that cannot be served; `status` is the HTTP status, `param` the field at fault."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class FileObject:
    """OpenAI's file object."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object: str = "file"
    status: str = "processed"

    def to_dict(self) -> dict:
        """As the API returns it."""
        return asdict(self)


class FileStore:
    """Files uploaded for fine-tuning, kept on disk across restarts."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()  # paths handed to processes that run from another folder

    def save(self, data: bytes, filename: str, purpose: str) -> FileObject:
        """Store an upload; refuses other purposes and empty files."""
        if purpose not in PURPOSES:
            raise FileError(f"purpose {purpose!r} is not supported here; use {' or '.join(PURPOSES)}", param="purpose")
        if not data.strip():
            raise FileError(f"{filename}: the file is empty", param="file")
        name = SAFE_NAME.sub("_", Path(filename or "upload.jsonl").name).strip("._") or "upload.jsonl"
        item = FileObject(f"file-{uuid.uuid4().hex[:24]}", len(data), int(time.time()), name, purpose)
        folder = self.root / item.id
        partial = self.root / f".{item.id}.partial"
        partial.mkdir(parents=True)
        (partial / name).write_bytes(data)
        (partial / META).write_text(json.dumps(item.to_dict(), indent=2) + "\n")
        partial.rename(folder)  # a file is listed only once it is whole
        return item

    def get(self, file_id: str) -> FileObject:
        """The file object, or FileError 404."""
        meta = self._folder(file_id) / META
        try:
            return FileObject(**json.loads(meta.read_text()))
        except (OSError, ValueError, TypeError) as error:
            raise FileError(f"No such File object: {file_id}", status=404, param="file_id") from error

    def path(self, file_id: str) -> Path:
        """Where the file's bytes are."""
        item = self.get(file_id)
        return self._folder(file_id) / item.filename

    def list(self) -> list[FileObject]:
        """Every stored file, newest first."""
        items = []
        if self.root.is_dir():
            for folder in self.root.iterdir():
                if folder.name.startswith("file-") and (folder / META).is_file():
                    items.append(self.get(folder.name))
        return sorted(items, key=lambda f: (f.created_at, f.id), reverse=True)

    def delete(self, file_id: str) -> None:
        """Remove a file (FileError 404 when there is none)."""
        self.get(file_id)
        shutil.rmtree(self._folder(file_id))

    def _folder(self, file_id: str) -> Path:
        if not re.fullmatch(r"file-[0-9a-f]{24}", file_id or ""):  # ids name folders: nothing else passes
            raise FileError(f"No such File object: {file_id}", status=404, param="file_id")
        return self.root / file_id
