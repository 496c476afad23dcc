"""The export's output folder, on kvlab's shared output rules (``kvlab.outputs``): an existing folder is
refused without ``--force``; with it, only the files a previous kvlab command listed in the folder's
manifest are removed, never a user's file."""

from __future__ import annotations

from pathlib import Path

from kvlab.errors import KvlabError
from kvlab.outputs import prepare_output_dir, record_output


class OutputFolder:
    """Records every file written (in the manifest, before writing it) so that the next ``--force``
    export removes exactly those."""

    def __init__(self, path: str | Path, force: bool):
        self.path = prepare_output_dir(path, force, what="export folder", hint=" (only kvlab's files are removed)")
        self.files: list[str] = []

    def file(self, name: str) -> Path:
        """Path for a new file ``name``; refuses to replace a file kvlab did not write."""
        target = self.path / name
        if target.exists():
            raise KvlabError(f"--out: {target} exists and was not written by kvlab export; move it away")
        self.files.append(name)
        record_output(self.path, name)  # listed before it is written: a crash leaves nothing unaccounted
        return target
