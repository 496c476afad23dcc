"""Output folders and files kvlab writes, and what ``--force`` may remove.

Every folder a command writes (``train --out``, ``compare --out``, convert/heal/export outputs) carries
``.kvlab-manifest.json``, the list of files kvlab wrote there. ``--force`` on a folder without that
manifest is refused; with it, only the listed files are removed (and folders they leave empty), never
anything else. Usage::

    out = prepare_output_dir(path, force)        # refuses, cleans kvlab's old files, or creates
    ... write out / "model.safetensors" ...
    record_output(out, "model.safetensors")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvlab.errors import KvlabError

MANIFEST = ".kvlab-manifest.json"


def manifest_files(folder: str | Path) -> list[str] | None:
    """The file names ``folder``'s manifest lists (relative), or None when it has no kvlab manifest."""
    from kvlab.safe_io import inside, read_json

    path = Path(folder) / MANIFEST
    if not (path.exists() or path.is_symlink()):
        return None
    data = read_json(path, what="kvlab manifest")
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or data.get("kvlab") != "outputs":
        raise KvlabError(f"{path}: not a kvlab manifest; refusing to use it")
    for name in files:
        inside(folder, name, f"{path}: files")  # a forged manifest cannot reach outside the folder
    return list(files)


def _write_manifest(folder: Path, files: list[str]) -> None:
    from kvlab.checkpoint import atomic_write

    text = json.dumps({"kvlab": "outputs", "files": sorted(set(files))}, indent=1) + "\n"
    atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(text))


def check_output_dir(path: str | Path, force: bool, what: str = "output folder", hint: str = "") -> None:
    """Raise unless ``path`` may be (re)written: absent, an empty folder, or a kvlab folder with ``force``."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir():
        raise KvlabError(f"{path}: exists and is not a folder; refusing to replace it")
    if not any(path.iterdir()):
        return
    if not force:
        raise KvlabError(f"{path}: {what} exists; pass --force to overwrite it{hint}")
    if manifest_files(path) is None:
        raise KvlabError(f"{path}: not a kvlab {what} (no {MANIFEST}); refusing to delete anything in it")


def _is_within(path: Path, folder: Path) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


def remove_recorded(folder: str | Path) -> None:
    """Delete the files ``folder``'s manifest lists (never following a symlink out of it), then the
    folders that leaves empty; everything else stays."""
    folder = Path(folder)
    names = manifest_files(folder) or []
    parents: set[Path] = set()
    for name in names:
        path = folder / name
        if not _is_within(path.parent, folder) and path.parent != folder:
            continue  # a symlinked sub-folder: not ours to reach through
        if path.is_symlink() or path.is_file():
            path.unlink()
        parents.update(p for p in path.parents if p != folder and folder in p.parents)
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        if parent.is_dir() and not parent.is_symlink() and not any(parent.iterdir()):
            parent.rmdir()


def prepare_output_dir(path: str | Path, force: bool = False, files: list[str] | tuple = (),
                       what: str = "output folder", hint: str = "") -> Path:
    """``path`` ready for a new output: checked (``check_output_dir``), kvlab's old files removed when
    ``force``, created, with a manifest listing ``files`` (record more with ``record_output``)."""
    path = Path(path)
    check_output_dir(path, force, what, hint)
    if path.is_dir() and manifest_files(path) is not None:
        remove_recorded(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_manifest(path, list(files))
    return path


def adopt_output_dir(path: str | Path, what: str = "output folder", legacy: tuple[str, ...] = ()) -> Path:
    """``path`` for a command that resumes into its own folder (no deletion): absent or empty (created,
    with a manifest), or already kvlab's (a manifest, or one of the ``legacy`` entries an older kvlab
    wrote). Anything else is refused."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KvlabError(f"{path}: exists and is not a folder; refusing to write into it")
    if path.is_dir() and any(path.iterdir()):
        if manifest_files(path) is None and not any((path / name).exists() for name in legacy):
            raise KvlabError(f"{path}: exists and is not a kvlab {what}; refusing to write into it")
        if manifest_files(path) is not None:
            return path
    path.mkdir(parents=True, exist_ok=True)
    _write_manifest(path, [])
    return path


def record_output(folder: str | Path, *names: str) -> None:
    """Add ``names`` (relative to ``folder``) to the files its manifest says kvlab wrote."""
    folder = Path(folder)
    _write_manifest(folder, [*(manifest_files(folder) or []), *names])


def output_file(path: str | Path, force: bool, flag: str = "--out", suffixes: tuple[str, ...] = ()) -> Path:
    """The final name of a single output file, checked: with ``suffixes``, a name without one gets the
    first (so the check below sees the file that will really be written) and another suffix is refused;
    an existing file needs ``force``; a folder, FIFO or device is never replaced; the parent must exist."""
    path = Path(path)
    if path.is_dir():
        raise KvlabError(f"{flag}: {path} is a folder; give a file name")
    if suffixes:
        if not path.suffix:
            path = path.with_name(path.name + suffixes[0])
        elif path.suffix.lower() not in suffixes:
            raise KvlabError(f"{flag}: {path}: unsupported file type {path.suffix!r} (use {', '.join(suffixes)})")
    if path.is_dir():
        raise KvlabError(f"{flag}: {path} is a folder; give a file name")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise KvlabError(f"{flag}: {path} exists and is not a regular file; refusing to replace it")
        if not force:
            raise KvlabError(f"{flag}: {path} exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise KvlabError(f"{flag}: {path.parent} is not an existing folder")
    return path
