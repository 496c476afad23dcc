"""The export's output folder: refuse an existing one without ``--force``; with ``--force`` remove only the
files a previous ``kvlab export`` listed in its manifest (``.kvlab-export.json``), never a user's file."""

from __future__ import annotations

import json
from pathlib import Path

from kvlab.errors import KvlabError

MANIFEST = ".kvlab-export.json"


class OutputFolder:
    """Records every file written so that the next ``--force`` export can remove exactly those."""

    def __init__(self, path: str | Path, force: bool):
        self.path = Path(path)
        self.files: list[str] = []
        if self.path.exists() and not self.path.is_dir():
            raise KvlabError(f"--out: {self.path} exists and is not a folder")
        if self.path.exists() and any(self.path.iterdir()):
            if not force:
                raise KvlabError(f"--out: {self.path} exists and is not empty; pass --force to replace a previous export")
            self._remove_previous()
        self.path.mkdir(parents=True, exist_ok=True)

    def _remove_previous(self) -> None:
        manifest = self.path / MANIFEST
        try:
            previous = json.loads(manifest.read_text())["files"] if manifest.exists() else []
        except (ValueError, KeyError, TypeError):
            raise KvlabError(f"--out: {manifest} is not a kvlab export manifest; not touching {self.path}") from None
        for name in previous:
            target = self.path / name
            if Path(name).name != name or not target.is_file():  # only plain files directly inside
                continue
            target.unlink()
        if manifest.exists():
            manifest.unlink()

    def file(self, name: str) -> Path:
        """Path for a new file ``name``; refuses to replace a file kvlab did not write."""
        target = self.path / name
        if target.exists():
            raise KvlabError(f"--out: {target} exists and was not written by kvlab export; move it away")
        self.files.append(name)
        self._save()  # the manifest lists a file before it is written: a crash leaves nothing unaccounted
        return target

    def _save(self) -> None:
        (self.path / MANIFEST).write_text(json.dumps({"writer": "kvlab export", "files": self.files}, indent=1) + "\n")
