"""The one place kvlab reads files a user (or someone who sent them a checkpoint) controls, and checks
memory before allocations sized by a user's number.

* Only regular files are opened (``os.stat`` + ``S_ISREG`` first, so a FIFO or a device never blocks or
  streams), with a size bound per kind of file; names read from a file (an index's ``weight_map``) must
  stay inside their folder.
* JSON refuses ``NaN``/``Infinity``; YAML is ``SafeLoader`` with a bound on aliases and on the size the
  document would expand to (no "billion laughs").
* safetensors: the header's size, dtypes, shapes and offsets are checked against the file's size before
  any tensor is read; nothing is ever unpickled.
* ``check_memory``: refuse up front, with the estimate in the message, what would not fit.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from kvlab.errors import ConfigError, KvlabError

MAX_CONFIG_BYTES = 16 * 2**20  # config.json / YAML / index / manifest / trainer state JSON
MAX_JSON_BYTES = 512 * 2**20  # tokenizer.json of large vocabularies runs to tens of MB
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own bound on its JSON header
MAX_YAML_ALIASES = 10_000
MAX_YAML_NODES = 1_000_000  # nodes the document expands to, aliases followed
_ST_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                   "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


# ---- files ------------------------------------------------------------------------------------------
def regular_file(path: str | Path, what: str = "file") -> Path:
    """``path`` if it names a regular file (symlinks followed); a one-line error otherwise. Never opens it."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise KvlabError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise KvlabError(f"{path}: cannot read ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise KvlabError(f"{path}: is a folder, expected a {what}")
    if not stat.S_ISREG(mode):
        raise KvlabError(f"{path}: not a regular file (a FIFO, socket or device); refusing to read it")
    return path


def inside(folder: str | Path, name: object, where: str) -> Path:
    """``folder / name`` for a relative ``name`` read from a file; absolute names and ``..`` are refused
    (symlinks the owner of the folder made are theirs to make, and are followed)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise KvlabError(f"{where}: expected a file name, got {name!r}")
    parts = Path(name).parts
    if os.path.isabs(name) or ".." in parts or name.startswith("~"):
        raise KvlabError(f"{where}: {name!r} points outside {folder}; refusing to follow it")
    return Path(folder) / name


def read_bytes(path: str | Path, limit: int = MAX_CONFIG_BYTES, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes."""
    path = regular_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise KvlabError(f"{path}: cannot read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):  # swapped between the stat and the open
            raise KvlabError(f"{path}: not a regular file; refusing to read it")
        if info.st_size > limit:
            raise KvlabError(f"{path}: {info.st_size:,} bytes, more than the {limit:,} kvlab reads for a {what}")
        return handle.read(limit + 1)[:limit]


def read_text(path: str | Path, limit: int = MAX_CONFIG_BYTES, what: str = "file") -> str:
    data = read_bytes(path, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KvlabError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number kvlab accepts")


def parse_json(text: str, where: str) -> Any:
    """JSON without ``NaN``/``Infinity``; malformed text is a one-line ``ConfigError``."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{where}: not valid JSON ({first})") from None


def read_json(path: str | Path, limit: int = MAX_CONFIG_BYTES, what: str = "JSON file") -> Any:
    return parse_json(read_text(path, limit, what), str(path))


def _yaml_loader():
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """SafeLoader that refuses documents with too many aliases or too large an expansion."""

        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:
                    raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases")
            return super().compose_node(parent, index)

        def get_single_node(self):
            node = super().get_single_node()
            if node is not None and _expanded_nodes(node) > MAX_YAML_NODES:
                raise yaml.YAMLError(f"aliases expand it past {MAX_YAML_NODES:,} nodes")
            return node

    return BoundedLoader


def _expanded_nodes(root) -> int:
    """Nodes of a composed YAML graph with every alias expanded (memoised: linear in distinct nodes)."""
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a cycle counts once
        value = node.value
        if isinstance(value, list):
            total = 1 + sum((size(item[0]) + size(item[1])) if isinstance(item, tuple) else size(item)
                            for item in value)
        else:
            total = 1
        sizes[id(node)] = min(total, MAX_YAML_NODES + 1)
        return sizes[id(node)]

    return size(root)


def parse_yaml(text: str, where: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{where}: not valid YAML ({first})") from None


def read_config(path: str | Path) -> dict:
    """A JSON or YAML config file (by suffix) as a dict; every failure is one line naming the file."""
    path = Path(path)
    text = read_text(path, MAX_CONFIG_BYTES, "config file")
    yaml_file = path.suffix in (".yaml", ".yml")
    data = parse_yaml(text, str(path)) if yaml_file else parse_json(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a {'YAML mapping' if yaml_file else 'JSON object'} at the top level")
    return data


# ---- safetensors ------------------------------------------------------------------------------------
def safetensors_header(path: str | Path) -> dict:
    """The checked header of a safetensors file: every tensor's dtype, shape and byte range agree with
    each other and with the file's size (a truncated or forged file is refused before reading)."""
    path = regular_file(path, "safetensors file")

    def bad(detail: str) -> KvlabError:
        return KvlabError(f"{path}: cannot read safetensors ({detail})")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, too short to be a safetensors file")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise bad(f"header claims {n:,} bytes but the file has {size:,}; truncated or not safetensors")
        raw = handle.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise bad("corrupt header: not JSON") from None
    if not isinstance(header, dict):
        raise bad("corrupt header")
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name!r}"
        if not isinstance(info, dict) or info.get("dtype") not in _ST_DTYPE_BYTES:
            raise bad(f"{where}: unknown dtype {info.get('dtype') if isinstance(info, dict) else info!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"{where}: invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise bad(f"{where}: byte range {offsets!r} lies outside the file ({data_bytes:,} data bytes)")
        if offsets[1] - offsets[0] != math.prod(shape) * _ST_DTYPE_BYTES[info["dtype"]]:
            raise bad(f"{where}: {offsets[1] - offsets[0]:,} bytes do not hold a {info['dtype']} "
                             f"tensor of shape {shape}")
    return header


def read_safetensors(path: str | Path) -> dict:
    """All tensors of one safetensors file, after ``safetensors_header``'s checks."""
    from safetensors.torch import load_file

    safetensors_header(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, ...: one line naming the file
        raise KvlabError(f"{path}: cannot read safetensors ({(str(exc).splitlines() or ['corrupt'])[0]})") from None


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: those its ``model.safetensors.index.json`` names
    (each inside the folder), else every ``*.safetensors`` in it."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        data = read_json(index, MAX_CONFIG_BYTES, "weight index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise KvlabError(f"{index}: weight_map: missing or not an object of tensor name -> file")
        names = sorted({v if isinstance(v, str) else repr(v) for v in weight_map.values()})
        return [inside(folder, name, f"{index}: weight_map") for name in names]
    return sorted(folder.glob("*.safetensors"))


# ---- memory -----------------------------------------------------------------------------------------
def available_memory(device=None) -> int:
    """Free bytes where tensors will live (CUDA: free device memory; CPU: MemAvailable)."""
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**27 else f"{n / 2**20:,.1f} MiB"


def check_memory(nbytes: int, what: str, hint: str = "", device=None) -> None:
    """Refuse ``what`` when its estimated ``nbytes`` exceed the memory available now."""
    have = available_memory(device)
    if nbytes > have:
        raise KvlabError(f"{what} needs about {gib(nbytes)}, more than the {gib(have)} available"
                         + (f"; {hint}" if hint else ""))


# ---- output -----------------------------------------------------------------------------------------
def first_nonfinite(value: Any, where: str = "") -> str | None:
    """The path (``speed.64.decode_tok_s``) of the first NaN or infinite number in ``value``, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "value"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = first_nonfinite(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def dumps_finite(value: Any, **kwargs) -> str:
    """``json.dumps`` that refuses (one line, naming the field) to write NaN or infinity."""
    bad = first_nonfinite(value)
    if bad:
        raise KvlabError(f"{bad}: the result is not a finite number; refusing to report it")
    return json.dumps(value, allow_nan=False, **kwargs)
