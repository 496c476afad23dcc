"""Argument parsing helpers shared by commands."""

from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def byte_size(text: str) -> int:
    """'80GiB', '24 GB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 80GiB, 24GB)")
    try:
        return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def token_count(text: str) -> int:
    """'32768', '32K', '1M' -> tokens (K = 1024)."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([kKmM]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 4096, 32K, 1M)")
    value = int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def token_counts(text: str) -> list[int]:
    return [token_count(part) for part in text.split(",") if part.strip()]


def positive_int(text: str) -> int:
    """A positive integer argument."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def check_new_file(path: str, force: bool, flag: str = "--out") -> None:
    """Refuse to overwrite an existing file the user did not ask to replace (one-line error)."""
    from pathlib import Path

    from kvlab.errors import KvlabError

    if Path(path).exists() and not force:
        raise KvlabError(f"{flag}: {path} exists; pass --force to overwrite it")
